"""The engine over the llama.cpp backend on the bundled default model (SmolLM2-135M-Instruct Q4_1)."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import prompt_request

from hearth.runtime import Engine, GenerationRequest, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three kinds of tea.",
    "Write one sentence about the sea.",
    "What is 2 + 2?",
    "Say hello in Chinese.",
    "Give me a word that rhymes with cat.",
    "What colour is the sky?",
    "Tell me a fun fact about cats.",
]


@pytest.fixture(scope="module")
def engine(smollm_gguf):
    # batch-invariant mode: a request's logits must not depend on what else is in the batch
    eng = Engine.from_model(str(smollm_gguf), backend="llamacpp", n_ctx=4096, n_seq_max=16, n_threads=2,
                            batch_invariant=True)
    yield eng
    eng.shutdown()


def greedy(n=32, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


def chat(q, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]


def test_greedy_equals_llama_cpp_python(engine, smollm_gguf):
    from llama_cpp import Llama

    # the same attention kernel as the backend's batch-invariant mode: flash attention over q8_0 KV
    # (ggml's per-row kernel whatever the ubatch)
    ref = Llama(str(smollm_gguf), n_ctx=1024, n_threads=2, flash_attn=True, type_k=8, type_v=8, verbose=False)
    try:
        for q in QUESTIONS[:3]:
            ids = (lambda r: r.prompt_token_ids)(prompt_request(engine, messages=chat(q)))
            ours = engine.generate_sync(GenerationRequest(prompt_token_ids=ids, params=greedy(24)))[0]
            theirs = ref.create_completion(ids, max_tokens=24, temperature=0.0, top_k=1, top_p=1.0,
                                           min_p=0.0, repeat_penalty=1.0)
            assert ours.text == theirs["choices"][0]["text"], q
            eos = theirs["choices"][0]["finish_reason"] == "stop"  # hearth counts the EOS token, it does not
            assert ours.usage.completion_tokens == theirs["usage"]["completion_tokens"] + eos
    finally:
        ref.close()


def test_answers_sensibly(engine):
    helpful = "You are a helpful assistant."
    out = engine.generate_sync(prompt_request(engine, messages=chat(QUESTIONS[0], helpful), params=greedy(24)))[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # the model ends its turn by itself
    out = engine.generate_sync(prompt_request(engine, messages=chat("What is the capital of Germany?", helpful),
                                                 params=greedy(24)))[0]
    assert "Berlin" in out.text


def test_eight_concurrent_equal_alone(smollm_gguf):
    # a fresh engine: cells freed by earlier tests' evicted prefixes would change the KV layout
    engine = Engine.from_model(str(smollm_gguf), backend="llamacpp", n_ctx=4096, n_seq_max=16, n_threads=2,
                               batch_invariant=True)
    alone = [engine.generate_sync(prompt_request(engine, messages=chat(q), params=greedy(24)))[0].token_ids
             for q in QUESTIONS]

    async def together():
        async def one(q):
            toks = []
            async for out in engine.generate(prompt_request(engine, messages=chat(q), params=greedy(24))):
                toks.extend(out.token_ids)
            return toks
        return await asyncio.gather(*(one(q) for q in QUESTIONS))

    try:
        assert asyncio.run(together()) == alone
        assert engine.stats().kv_active_sequences == 0
    finally:
        engine.shutdown()


def test_chinese_stream_never_breaks_a_character(engine):
    req = prompt_request(engine, messages=chat("请用中文介绍一下你自己。🙂"),
                            params=SamplingParams(max_tokens=48, temperature=0.8, seed=1))
    outs = list(engine.stream_sync(req))
    deltas = [out.text for out in outs]
    # a U+FFFD may only be one the model itself wrote (bytes that never form a character), never a
    # character cut between chunks: the stream equals the whole decode, and each break is clean
    whole = engine.tokenizer.decode([t for o in outs for t in o.token_ids])
    assert "".join(deltas) == whole
    assert all("\ufffd" not in d or "\ufffd" in whole for d in deltas)
    assert len(whole) > 0


def test_shared_system_prompt_hits_prefix_cache(engine, smollm_gguf):
    system = "You are a helpful assistant who answers in one short sentence. " * 20
    engine.generate_sync(prompt_request(engine, messages=chat("Hi!", system), params=greedy(4)))
    warm = engine.generate_sync(prompt_request(engine, messages=chat(QUESTIONS[1], system), params=greedy(16)))[0]
    assert warm.usage.cached_tokens > 0.8 * warm.usage.prompt_tokens - 20
    cold_engine = Engine.from_model(str(smollm_gguf), backend="llamacpp", n_ctx=2048, n_threads=2,
                                    prefix_cache=False, batch_invariant=True)
    try:
        cold = cold_engine.generate_sync(prompt_request(cold_engine, messages=chat(QUESTIONS[1], system),
                                                           params=greedy(16)))[0]
    finally:
        cold_engine.shutdown()
    assert cold.usage.cached_tokens == 0
    assert warm.token_ids == cold.token_ids


def test_abort_frees_kv(engine):
    req = prompt_request(engine, messages=chat("Count from one to one hundred."), params=greedy(300))
    seen = 0
    for out in engine.stream_sync(req):
        seen += 1
        if seen == 2:
            engine.abort(req.request_id)
        if out.finish_reason:
            assert out.finish_reason == "abort"
    st = engine.stats()
    assert st.kv_active_sequences == 0 and st.running == 0
    assert engine.backend.kv.orphaned_kv() == {}


def test_logprobs_and_seeded_sampling(engine):
    p = SamplingParams(max_tokens=12, temperature=0.9, seed=11, logprobs=True, top_logprobs=2)
    a = engine.generate_sync(prompt_request(engine, messages=chat(QUESTIONS[2]), params=p))[0]
    b = engine.generate_sync(prompt_request(engine, messages=chat(QUESTIONS[2]), params=p))[0]
    assert a.token_ids == b.token_ids
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in a.logprobs)
