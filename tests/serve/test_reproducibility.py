"""Reproducibility through the HTTP server on the bundled default model (issue 16): the same seeded
request twice in a row gives the same text with the prefix cache on (the default), and lm-eval's
loglikelihood requests score the same whether sent alone or concurrently."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
SYSTEM = "You are the assistant of a small tea shop by the sea. Answer warmly and in full sentences. " * 4


def test_same_seed_twice_gives_the_same_text(served):
    client = served.client()
    for seed, question in ((11, "Tell me a story about the moon."), (12, "Describe your favourite tea.")):
        kw = dict(model=MODEL, messages=[{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": question}],
                  temperature=1.0, seed=seed, max_tokens=40, logprobs=True)
        first, second = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
        assert second.usage.prompt_tokens_details.cached_tokens > 0  # the repeat did hit the cache
        assert second.choices[0].message.content == first.choices[0].message.content
        lps = lambda r: [t.logprob for t in r.choices[0].logprobs.content]  # noqa: E731
        assert lps(second) == lps(first)


def test_scoring_logprobs_are_the_same_alone_and_concurrent(served):
    texts = [f"Question: which tea suits {w}? Answer: a {t} tea, brewed for three minutes."
             for w, t in (("a cold morning", "black"), ("the afternoon", "oolong"), ("late evening", "rooibos"),
                          ("a picnic", "green"), ("a rainy day", "smoky"), ("a birthday", "jasmine"))]
    client = served.async_client()

    async def score(text):
        r = await client.completions.create(model=MODEL, prompt=text, echo=True, logprobs=0, max_tokens=0)
        return r.choices[0].logprobs.token_logprobs

    async def chat():  # other traffic beside the concurrent scoring requests
        await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to ten."}],
                                             temperature=0, max_tokens=16)

    async def run():
        alone = [await score(t) for t in texts]
        together = await asyncio.gather(*(score(t) for t in texts), chat(), chat())
        return alone, list(together[:len(texts)])

    alone, together = asyncio.run(run())
    assert all(len(a) > 10 for a in alone)
    assert together == alone
