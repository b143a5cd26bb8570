"""Reproducibility (issue 16): a seeded request repeated with the prefix cache on gives the same
tokens and logprobs; scoring logprobs do not depend on what else runs; temperature 0 concurrent equals
alone in batch-invariant mode."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import prompt_request
from tests.runtime.test_engine_transformers import PROMPTS, make_engine

from hearth.runtime import Engine, GenerationRequest, SamplingParams

SYSTEM = "You are the assistant of a tea shop. Answer briefly and kindly. " * 6


def _seeded(seed: int, n: int = 16) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=seed, logprobs=True, ignore_eos=True)


def _run_twice(engine, **prompt):
    """The same seeded request twice in a row: (first, second) results."""
    req = lambda: prompt_request(engine, **prompt)  # noqa: E731
    return engine.generate_sync(req())[0], engine.generate_sync(req())[0]


def _same(a, b) -> bool:
    return a.token_ids == b.token_ids and [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


def _gather(engine, requests) -> list[list]:
    async def one(req):
        return [out async for out in engine.generate(req)]

    async def all_of():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(all_of())


def _score(ids) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=list(ids), params=SamplingParams(max_tokens=0, prompt_logprobs=0))


def _prompt_lps(outs) -> list[float]:
    return [lp.logprob for o in outs if o.prompt_logprobs for lp in o.prompt_logprobs if lp is not None]


def _assert_scoring_alone_equals_together(eng, texts: list[list[int]], busy_tokens: int) -> None:
    """Score each text alone, then all at once beside 3 generating requests: identical logprobs."""
    alone = [_prompt_lps(_gather(eng, [_score(t)])[0]) for t in texts]
    busy = [GenerationRequest(prompt_token_ids=eng.tokenizer.encode(p), params=SamplingParams(
        max_tokens=busy_tokens, temperature=0.0, ignore_eos=True)) for p in PROMPTS[:3]]
    outs = _gather(eng, busy + [_score(t) for t in texts])
    together = [_prompt_lps(o) for o in outs[len(busy):]]
    assert all(len(a) == len(t) - 1 for a, t in zip(alone, texts))
    assert together == alone


# ---- transformers backend, tiny random model ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_llama):
    eng = make_engine(tiny_llama, kv_cache_gb=0.05)  # prefix cache on, the default
    yield eng
    eng.shutdown()


def test_seeded_repeat_identical_with_prefix_cache_transformers(tiny_engine):
    for seed, prompt in enumerate((" ".join(PROMPTS), " ".join(PROMPTS[2:]) * 2, PROMPTS[3])):
        first, second = _run_twice(tiny_engine, prompt=prompt, params=_seeded(seed))
        assert second.usage.cached_tokens > 0 or len(second.prompt_token_ids) <= 16
        assert _same(first, second), prompt


def test_scoring_logprobs_do_not_depend_on_concurrency_transformers(tiny_llama):
    # a small step budget: beside other requests a prompt would be split at other places
    eng = make_engine(tiny_llama, kv_cache_gb=0.05, max_num_batched_tokens=24)
    try:
        texts = [eng.tokenizer.encode(" ".join(PROMPTS[k:]) + " " + PROMPTS[k]) for k in range(6)]
        _assert_scoring_alone_equals_together(eng, texts, busy_tokens=12)
    finally:
        eng.shutdown()


# ---- llama.cpp backend, the bundled default model -------------------------------------------------
@pytest.fixture(scope="module")
def gguf_engine(smollm_gguf):
    # the server's defaults: prefix cache on, batch_invariant at its default
    eng = Engine.from_model(str(smollm_gguf), backend="llamacpp", n_ctx=2048, n_seq_max=16, n_threads=2)
    yield eng
    eng.shutdown()


def test_seeded_repeat_identical_with_prefix_cache_llamacpp(gguf_engine):
    for seed, system in ((1, SYSTEM), (2, None), (3, SYSTEM[:120])):
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": "Tell me about the moon."}]
        first, second = _run_twice(gguf_engine, messages=msgs, params=_seeded(seed, 24))
        assert second.usage.cached_tokens > 0
        assert _same(first, second), (seed, first.text, second.text)


def test_scoring_logprobs_do_not_depend_on_concurrency_llamacpp(smollm_gguf):
    # batch_invariant off (a deployment's opt-out): scoring must still not depend on the batch
    eng = Engine.from_model(str(smollm_gguf), backend="llamacpp", n_ctx=2048, n_seq_max=16, n_threads=2,
                            batch_invariant=False)
    try:
        texts = [eng.tokenizer.encode(f"Question {k}: {p} Answer: tea, with water just off the boil.")
                 for k, p in enumerate(PROMPTS)]
        _assert_scoring_alone_equals_together(eng, texts, busy_tokens=8)
    finally:
        eng.shutdown()
