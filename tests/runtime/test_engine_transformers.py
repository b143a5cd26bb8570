"""The engine over the transformers backend, on tiny random models: equal to HF, batched equal to alone."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from hearth.runtime import (ContextLengthExceeded, Engine, GenerationRequest, InvalidRequestError,
                            SamplingParams)
from hearth.runtime.backends.transformers import TransformersBackend

from tests.conftest import build_tiny_model, prompt_request

PROMPTS = [
    "The quick brown fox",
    "hearth serves",
    "你好，世界",
    "Tea is best brewed with water just off the boil. The quick brown fox jumps",
    "Emoji 🙂",
    "user assistant",
    "lazy dog",
    "brewed",
]


def make_engine(path, **kw):
    engine_kw = {k: kw.pop(k) for k in list(kw) if k in ("max_num_seqs", "max_num_batched_tokens", "prefix_cache")}
    backend = TransformersBackend(path, dtype="float32", device="cpu", **kw)
    return Engine(backend, **engine_kw)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    eng = make_engine(tiny_llama, kv_cache_gb=0.05)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    return m


def greedy(max_tokens=24, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_equals_hf_generate(engine, hf_model):
    for prompt in PROMPTS[:4]:
        ids = engine.tokenizer.encode(prompt)
        ours = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy()))[0]
        assert ours.token_ids == hf_greedy(hf_model, ids, 24), prompt
        assert ours.finish_reason == "length"
        assert ours.usage.completion_tokens == 24 and ours.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_families_equal_hf(tmp_path, model_type):
    from transformers import AutoModelForCausalLM
    path = build_tiny_model(tmp_path / model_type, model_type=model_type)
    eng = make_engine(path, kv_cache_gb=0.02)
    try:
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ref.generation_config.eos_token_id = None
        ids = eng.tokenizer.encode(PROMPTS[3])
        ours = eng.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(16)))[0]
        assert ours.token_ids == hf_greedy(ref, ids, 16)
    finally:
        eng.shutdown()


def test_concurrent_requests_equal_alone(engine):
    alone = [engine.generate_sync(prompt_request(engine, prompt=p, params=greedy(20)))[0].token_ids for p in PROMPTS]

    async def run_all():
        async def one(p):
            toks = []
            async for out in engine.generate(prompt_request(engine, prompt=p, params=greedy(20))):
                toks.extend(out.token_ids)
            return toks
        return await asyncio.gather(*(one(p) for p in PROMPTS))

    together = asyncio.run(run_all())
    assert together == alone
    assert engine.stats().kv_active_sequences == 0


def test_chunked_prefill_and_tiny_kv_preemption_keep_outputs(tiny_llama, engine):
    long_prompt = " ".join(PROMPTS) * 2
    ref = [engine.generate_sync(prompt_request(engine, prompt=p, params=greedy(30)))[0].token_ids
           for p in (long_prompt, *PROMPTS[:5])]
    # 16-token steps force chunked prefill; 20 blocks of KV (per token: 2 layers x K,V x 2 heads x 16
    # dims x 4 bytes) for ~27 blocks of demand force preemption and recompute
    eng = make_engine(tiny_llama, kv_cache_gb=20 * 16 * 2 * 2 * 2 * 16 * 4 / 2**30, max_num_batched_tokens=16)
    try:
        results = [None] * 6
        def run(i, p):
            results[i] = eng.generate_sync(prompt_request(eng, prompt=p, params=greedy(30)))[0].token_ids
        threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate((long_prompt, *PROMPTS[:5]))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == ref
        assert eng.scheduler.num_preemptions > 0
        assert eng.stats().kv_active_sequences == 0
    finally:
        eng.shutdown()


def test_prefix_cache_reuses_shared_system_prompt(tiny_llama):
    system = "Tea is best brewed with water just off the boil. " * 6
    eng = make_engine(tiny_llama, kv_cache_gb=0.05)
    cold = make_engine(tiny_llama, kv_cache_gb=0.05, prefix_cache=False)
    try:
        msgs = lambda q: [{"role": "system", "content": system}, {"role": "user", "content": q}]
        first = eng.generate_sync(prompt_request(eng, messages=msgs("hello"), params=greedy(8)))[0]
        second = eng.generate_sync(prompt_request(eng, messages=msgs("lazy dog"), params=greedy(8)))[0]
        assert first.usage.cached_tokens == 0
        assert second.usage.cached_tokens >= 16 * ((first.usage.prompt_tokens - 10) // 16) - 16
        assert second.usage.cached_tokens > 0
        ref = cold.generate_sync(prompt_request(cold, messages=msgs("lazy dog"), params=greedy(8)))[0]
        assert second.token_ids == ref.token_ids
        assert ref.usage.cached_tokens == 0
    finally:
        eng.shutdown()
        cold.shutdown()


def test_seeded_sampling_is_reproducible(engine):
    p = lambda seed: SamplingParams(max_tokens=20, temperature=1.0, seed=seed, ignore_eos=True)
    a = engine.generate_sync(prompt_request(engine, prompt="The quick", params=p(7)))[0].token_ids
    b = engine.generate_sync(prompt_request(engine, prompt="The quick", params=p(7)))[0].token_ids
    c = engine.generate_sync(prompt_request(engine, prompt="The quick", params=p(8)))[0].token_ids
    assert a == b
    assert a != c


def test_n_choices_are_independent_and_seeded(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=3, n=3, ignore_eos=True)
    res = engine.generate_sync(prompt_request(engine, prompt="hearth serves", params=params))
    again = engine.generate_sync(prompt_request(engine, prompt="hearth serves", params=params))
    assert [r.index for r in res] == [0, 1, 2]
    assert [r.token_ids for r in res] == [r.token_ids for r in again]
    assert len({tuple(r.token_ids) for r in res}) > 1


def test_logit_bias_forces_and_bans(engine):
    ids = engine.tokenizer.encode("The quick")
    base = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(8)))[0].token_ids
    forced = engine.generate_sync(prompt_request(engine,
        prompt_token_ids=ids, params=greedy(8, logit_bias={42: 100.0})))[0].token_ids
    assert forced == [42] * 8
    banned = engine.generate_sync(prompt_request(engine,
        prompt_token_ids=ids, params=greedy(8, logit_bias={base[0]: -100.0})))[0].token_ids
    assert banned[0] != base[0]


def test_frequency_penalty_reduces_repeats(engine):
    ids = engine.tokenizer.encode("lazy")
    plain = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(40)))[0].token_ids
    pen = engine.generate_sync(prompt_request(engine,
        prompt_token_ids=ids, params=greedy(40, frequency_penalty=2.0)))[0].token_ids
    assert len(set(pen)) > len(set(plain))


def test_logprobs_match_plain_forward(engine, hf_model):
    ids = engine.tokenizer.encode("The quick brown fox")
    res = engine.generate_sync(prompt_request(engine,
        prompt_token_ids=ids, params=greedy(6, logprobs=True, top_logprobs=3, prompt_logprobs=2)))[0]
    full = ids + res.token_ids
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([full])).logits[0].float(), -1).numpy()
    for i, lp in enumerate(res.logprobs):
        pos = len(ids) + i - 1
        assert lp.logprob <= 0
        assert lp.token_id == res.token_ids[i]
        assert abs(lp.logprob - logp[pos, lp.token_id]) < 1e-3
        assert [t for t, _ in lp.top][0] == int(np.argmax(logp[pos]))
        assert len(lp.top) == 3
    assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(ids)
    for j in range(1, len(ids)):
        assert abs(res.prompt_logprobs[j].logprob - logp[j - 1, ids[j]]) < 1e-3


def test_echo_scoring_with_zero_max_tokens(engine):
    ids = engine.tokenizer.encode("The quick brown fox jumps")
    res = engine.generate_sync(prompt_request(engine,
        prompt_token_ids=ids, params=SamplingParams(max_tokens=0, prompt_logprobs=0)))[0]
    assert res.token_ids == [] and res.finish_reason == "length"
    assert len(res.prompt_logprobs) == len(ids)
    assert all(lp.logprob <= 0 for lp in res.prompt_logprobs[1:])


def test_stop_string_cuts_text(engine):
    full = engine.generate_sync(prompt_request(engine, prompt="The quick", params=greedy(30)))[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = engine.generate_sync(prompt_request(engine, prompt="The quick", params=greedy(30, stop=[stop])))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]


def test_stop_token_id(engine):
    full = engine.generate_sync(prompt_request(engine, prompt="The quick", params=greedy(10)))[0]
    tok = full.token_ids[4]
    cut = engine.generate_sync(prompt_request(engine, prompt="The quick", params=greedy(10, stop_token_ids=[tok])))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == tok
    assert cut.token_ids == full.token_ids[:full.token_ids.index(tok) + 1]


def test_abort_mid_stream_frees_kv(engine):
    async def run():
        req = prompt_request(engine, prompt="The quick brown fox", params=greedy(200))
        got = 0
        async for out in engine.generate(req):
            got += 1
            if got == 3:
                break  # leaving the iterator aborts the request
        for _ in range(200):
            if engine.stats().kv_active_sequences == 0 and engine.stats().running == 0:
                break
            await asyncio.sleep(0.01)
        return got
    assert asyncio.run(run()) == 3
    st = engine.stats()
    assert st.kv_active_sequences == 0 and st.running == 0 and st.waiting == 0


def test_explicit_abort_reports_finish_reason(engine):
    req = prompt_request(engine, prompt="The quick brown fox", params=greedy(400))
    reasons = []
    for out in engine.stream_sync(req):
        if len(reasons) == 0:
            engine.abort(req.request_id)
        reasons.append(out.finish_reason)
    assert reasons[-1] == "abort"
    assert engine.stats().kv_active_sequences == 0


def test_bad_input_errors(engine):
    with pytest.raises(InvalidRequestError, match="empty"):
        prompt_request(engine, prompt="")
    with pytest.raises(InvalidRequestError, match="empty"):
        GenerationRequest(prompt_token_ids=[])
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_tokens=0)
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(top_p=1.5)
    assert e.value.param == "top_p"
    with pytest.raises(InvalidRequestError):
        SamplingParams(top_p=0.0)
    with pytest.raises(ContextLengthExceeded) as e:
        engine.generate_sync(GenerationRequest(prompt_token_ids=[5] * 600, params=greedy(4)))
    assert e.value.prompt_tokens == 600 and e.value.max_model_len == 512
    assert "600" in str(e.value) and "512" in str(e.value)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        engine.generate_sync(GenerationRequest(prompt_token_ids=[10**7], params=greedy(4)))


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_bitsandbytes_quantized_model_equals_its_hf_generate(tmp_path, quant):
    path = build_tiny_model(tmp_path / "m", hidden_size=128, intermediate_size=256)
    eng = make_engine(path, quantization=quant, kv_cache_gb=0.02)
    try:
        import bitsandbytes as bnb
        q_proj = eng.backend.model.model.layers[0].self_attn.q_proj
        assert isinstance(q_proj, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
        ids = eng.tokenizer.encode("The quick brown fox")
        ours = eng.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(12)))[0]
        eng.backend.model.generation_config.eos_token_id = None
        assert ours.token_ids == hf_greedy(eng.backend.model, ids, 12)
    finally:
        eng.shutdown()


def test_bad_model_paths_fail_clearly(tmp_path, tiny_llama):
    import shutil

    from hearth.runtime import ModelLoadError, ModelNotFoundError, UnsafeCheckpointError

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        Engine.from_model(str(missing))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    data = (corrupt / "model.safetensors").read_bytes()
    (corrupt / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        TransformersBackend(corrupt, device="cpu")
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    (pickled / "model.safetensors").unlink()
    state = {"w": torch.zeros(2)}
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="allow"):
        TransformersBackend(pickled, device="cpu")


def test_scoring_request_beside_a_kv_filling_generation_returns_its_prompt_logprobs(tiny_llama, engine):
    """A scoring request beside a generation that fills the KV and a 4-token step budget: it is
    scored whole in one step (never split by the budget), with no sampled token and the logprobs
    it gets alone."""
    scored = engine.tokenizer.encode(" ".join(PROMPTS))[:40]
    ref = engine.generate_sync(prompt_request(engine,
        prompt_token_ids=scored, params=SamplingParams(max_tokens=0, prompt_logprobs=0)))[0]
    # 5 blocks of 16 tokens; 4 tokens per step, which a scoring prompt does not wait for
    eng = make_engine(tiny_llama, kv_cache_gb=80 * 512 / 2**30, max_num_batched_tokens=4)
    try:
        import queue
        gen_ids = engine.tokenizer.encode(" ".join(PROMPTS) * 2)[:20]
        gen_req = GenerationRequest(prompt_token_ids=gen_ids, params=greedy(60))
        score_req = GenerationRequest(prompt_token_ids=scored,
                                      params=SamplingParams(max_tokens=0, prompt_logprobs=0))
        gen_q, score_q = queue.Queue(), queue.Queue()
        with eng._cv:  # both arrive before the loop's next step: the schedule is deterministic
            eng._submit(gen_req, gen_q.put)
            eng._submit(score_req, score_q.put)
        res = score_q.get(timeout=120)
        gen_tokens = []
        while True:
            item = gen_q.get(timeout=120)
            gen_tokens.extend(item.token_ids)
            if item.finish_reason:
                break
        assert res.token_ids == [] and res.finish_reason == "length"
        assert len(res.prompt_logprobs) == len(scored)
        assert [a.logprob for a in res.prompt_logprobs[1:]] == [b.logprob for b in ref.prompt_logprobs[1:]]
        assert len(gen_tokens) == 60
    finally:
        eng.shutdown()


def test_a_closed_event_loop_under_a_running_request_does_not_kill_the_engine(engine):
    """An in-process client that times out and closes its loop while tokens still stream (the agent
    CLI did) used to kill the engine thread with 'Event loop is closed'."""
    loop = asyncio.new_event_loop()
    gen = engine.generate(prompt_request(engine, prompt="The quick brown fox", params=greedy(400)))
    loop.run_until_complete(gen.__anext__())  # streaming has begun
    loop.close()  # the generator is abandoned with its loop, as a timed-out asyncio.run leaves it
    deadline = time.monotonic() + 30
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.healthy and engine.stats().running == 0
    assert engine.generate_sync(prompt_request(engine, prompt="The quick", params=greedy(4)))[0].token_ids
