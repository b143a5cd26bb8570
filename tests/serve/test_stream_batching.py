"""Streamed tokens batched in a time window (what the Ray replicas do): nothing lost, nothing reordered.

    python -m pytest tests/serve/test_stream_batching.py -q
"""

from __future__ import annotations

import asyncio

import pytest

from hearth.runtime.types import GenerationOutput, TokenLogprob, Usage
from hearth.serve.model_service import _batched, merge_outputs


def _out(index: int, tok: int, finish: str | None = None) -> GenerationOutput:
    return GenerationOutput(request_id="r", index=index, text=f"<{index}:{tok}>", token_ids=[tok],
                            logprobs=[TokenLogprob(tok, -0.5, [])], finish_reason=finish,
                            usage=Usage(3, tok + 1) if finish else None)


def test_merge_joins_each_choice_in_order():
    outs = [_out(0, 0), _out(1, 0), _out(0, 1), _out(1, 1, "length"), _out(0, 2, "stop")]
    merged = merge_outputs(outs)
    assert [m.index for m in merged] == [0, 1]
    zero, one = merged
    assert zero.text == "<0:0><0:1><0:2>" and zero.token_ids == [0, 1, 2]
    assert [lp.token_id for lp in zero.logprobs] == [0, 1, 2]
    assert zero.finish_reason == "stop" and zero.usage == Usage(3, 3)
    assert one.text == "<1:0><1:1>" and one.finish_reason == "length"
    assert outs[0].text == "<0:0>" and outs[0].token_ids == [0]  # inputs are not modified


async def _engine(n: int, step_s: float, closed: list[bool]):
    try:
        for i in range(n):
            await asyncio.sleep(step_s)
            yield _out(0, i, "length" if i == n - 1 else None)
    finally:
        closed.append(True)


async def test_batched_stream_keeps_every_token_and_sends_fewer_messages():
    closed: list[bool] = []
    batches = [b async for b in _batched(_engine(30, 0.004, closed), interval_s=0.03)]
    outs = [o for b in batches for o in b]
    assert "".join(o.text for o in outs) == "".join(f"<0:{i}>" for i in range(30))
    assert [t for o in outs for t in o.token_ids] == list(range(30))
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert len(batches) < 15  # ~4 ms per token, 30 ms window
    assert closed == [True]


async def test_leaving_a_batched_stream_closes_the_engine_stream():
    closed: list[bool] = []
    agen = _batched(_engine(1000, 0.002, closed), interval_s=0.01)
    first = await agen.__anext__()
    assert first
    await agen.aclose()
    assert closed == [True]


async def test_an_engine_error_mid_stream_reaches_the_consumer():
    async def failing():
        yield _out(0, 0)
        await asyncio.sleep(0.001)
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        async for _ in _batched(failing(), interval_s=0.01):
            pass
