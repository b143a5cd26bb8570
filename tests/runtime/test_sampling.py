"""Tests of the sampler: each knob does what it says, seeds reproduce, logprobs are the model's own.

    python -m pytest tests/runtime/test_sampling.py -q
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from hearth.runtime.sampling import SamplerState, log_softmax, prompt_logprobs, sample
from hearth.runtime.types import SamplingParams

V = 1000


def _logits(batch: int = 4, vocab: int = V, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((batch, vocab)) * scale).astype(np.float32)


def _states(n: int, prompt: list[int] | None = None, **kw) -> list[SamplerState]:
    return [SamplerState(SamplingParams(**kw), prompt or []) for _ in range(n)]


def _draw_many(row: np.ndarray, n: int, **kw) -> np.ndarray:
    """Tokens from n independent seeded sequences sampling the same row."""
    logits = np.repeat(row[None, :], n, axis=0)
    states = [SamplerState(SamplingParams(seed=i, **kw), []) for i in range(n)]
    return np.array(sample(logits, states)[0])


def test_numpy_only():
    # The llama.cpp path samples without torch installed.
    code = "import sys, hearth.runtime.sampling; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_greedy_is_argmax_and_top_k_1_is_greedy():
    x = _logits(8)
    toks, lps = sample(x, _states(8, temperature=0.0))
    assert toks == list(x.argmax(axis=1))
    assert lps == [None] * 8
    assert sample(x, _states(8, top_k=1, temperature=1.5))[0] == toks


def test_same_seed_same_tokens_different_seed_differs():
    x = _logits(1, scale=0.5)  # flat enough that draws vary

    def run(seed: int, index: int = 0) -> list[int]:
        st = SamplerState(SamplingParams(seed=seed, top_p=0.9, top_k=200, min_p=0.01), [1, 2], index=index)
        out = []
        for _ in range(30):
            tok = sample(x, [st])[0][0]
            st.append(tok)
            out.append(tok)
        return out

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7, index=1) != run(7) and run(7, index=1) == run(7, index=1)
    assert run(-3) == run(-3)  # negative seeds are allowed by SamplingParams


def test_batch_rows_are_independent_of_neighbours():
    x = _logits(3, scale=0.5)
    alone = sample(x[1:2], [SamplerState(SamplingParams(seed=5), [])])[0][0]
    mixed = [SamplerState(SamplingParams(temperature=0.0), []), SamplerState(SamplingParams(seed=5), []),
             SamplerState(SamplingParams(seed=9, top_k=3, logprobs=True), [])]
    assert sample(x, mixed)[0][1] == alone


def test_unseeded_draws_follow_the_distribution():
    row = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    toks = sample(np.repeat(row[None], 4000, axis=0), _states(4000))[0]
    freq = np.bincount(toks, minlength=3) / 4000
    assert np.allclose(freq, [0.5, 0.3, 0.2], atol=0.04)


def test_draws_across_blocks_of_a_wide_vocab():
    # The draw sums blocks of the vocabulary first: mass in several blocks and the last, short one.
    row = np.full(1000, -np.inf, dtype=np.float32)
    ids, probs = [10, 300, 301, 700, 999], [0.1, 0.2, 0.3, 0.15, 0.25]
    row[ids] = np.log(probs)
    toks = sample(np.repeat(row[None], 4000, axis=0), _states(4000))[0]
    freq = np.bincount(toks, minlength=1000)[ids] / 4000
    assert set(toks) <= set(ids) and np.allclose(freq, probs, atol=0.04)


def test_temperature_sharpens():
    row = np.log(np.array([0.4, 0.35, 0.25], dtype=np.float32))
    cold = np.bincount(_draw_many(row, 2000, temperature=0.1), minlength=3)
    assert cold[0] / 2000 > 0.75


def test_top_k_keeps_only_k_best():
    row = _logits(1)[0]
    best = set(np.argsort(row)[-5:].tolist())
    assert set(_draw_many(row, 500, top_k=5, temperature=2.0).tolist()) <= best


def test_top_p_tiny_keeps_only_the_top_token():
    row = _logits(1, scale=0.3)[0]
    assert set(_draw_many(row, 300, top_p=1e-6, temperature=2.0).tolist()) == {int(row.argmax())}


def test_top_p_keeps_the_nucleus():
    probs = np.array([0.5, 0.3, 0.1, 0.05, 0.05], dtype=np.float32)
    drawn = set(_draw_many(np.log(probs), 800, top_p=0.85).tolist())
    assert drawn == {0, 1, 2}  # 0.5 + 0.3 < 0.85, so the token that crosses (0.1) is kept


def test_min_p_drops_unlikely_tokens():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04], dtype=np.float32)
    drawn = set(_draw_many(np.log(probs), 800, min_p=0.15).tolist())
    assert drawn == {0, 1, 2}  # kept: p >= 0.15 * 0.5 = 0.075


def test_logit_bias_forces_and_bans():
    x = _logits(4)
    forced = sample(x, _states(4, logit_bias={17: 100.0}, seed=1))[0]
    assert forced == [17] * 4
    top = x.argmax(axis=1)
    banned = sample(x, _states(4, temperature=0.0, logit_bias={int(t): -100.0 for t in top}))[0]
    assert all(b != t for b, t in zip(banned, top))
    # an id past the vocabulary width is ignored, not an IndexError
    assert sample(x, _states(4, temperature=0.0, logit_bias={V + 5: 5.0}))[0] == list(top)


def test_repetition_penalty_ctrl_style():
    row = np.array([[2.0, 1.9, -1.0, -1.05]], dtype=np.float32)
    assert sample(row, _states(1, temperature=0.0))[0] == [0]
    # 0 is in the prompt: 2.0 / 1.2 < 1.9, so 1 wins
    assert sample(row, _states(1, prompt=[0], temperature=0.0, repetition_penalty=1.2))[0] == [1]
    # a negative logit is multiplied (more negative), never divided towards 0
    neg = np.array([[-5.0, -5.0, -1.0, -1.05]], dtype=np.float32)
    assert sample(neg, _states(1, prompt=[2], temperature=0.0, repetition_penalty=1.2))[0] == [3]
    # generated tokens count too
    st = SamplerState(SamplingParams(temperature=0.0, repetition_penalty=1.2), [])
    st.append(0)
    assert sample(row, [st])[0] == [1]


def test_presence_and_frequency_penalties_use_output_only():
    row = np.array([[3.0, 2.5, 0.0]], dtype=np.float32)
    st = SamplerState(SamplingParams(temperature=0.0, presence_penalty=1.0), prompt_token_ids=[1])
    assert sample(row, [st])[0] == [0]  # the prompt token 1 is not penalised
    st.append(0)
    assert sample(row, [st])[0] == [1]  # 3.0 - 1.0 < 2.5

    st = SamplerState(SamplingParams(temperature=0.0, frequency_penalty=0.2), [])
    for expected in (0, 0, 0, 1):  # 3.0 - 0.2 * count drops below 2.5 after three repeats
        tok = sample(row, [st])[0][0]
        assert tok == expected
        st.append(tok)
    assert st.output_counts.count(0) == 3


def test_frequency_penalty_reduces_repeats_when_sampling():
    x = _logits(1, vocab=50, scale=2.0)

    def repeats(freq: float) -> int:
        st = SamplerState(SamplingParams(seed=3, frequency_penalty=freq), [])
        toks = []
        for _ in range(200):
            tok = sample(x, [st])[0][0]
            st.append(tok)
            toks.append(tok)
        return int(np.bincount(toks).max())

    assert repeats(2.0) < repeats(0.0)


def test_logprobs_are_raw_log_softmax():
    x = _logits(3)
    states = _states(3, logprobs=True, top_logprobs=5, seed=2, logit_bias={3: 50.0}, temperature=0.7)
    toks, lps = sample(x, states)
    ref = log_softmax(x)
    for r, (tok, lp) in enumerate(zip(toks, lps)):
        assert lp is not None and lp.token_id == tok
        assert lp.logprob <= 0.0
        # the model's distribution, not the biased/tempered one
        assert lp.logprob == pytest.approx(ref[r, tok], abs=1e-5)
        assert len(lp.top) == 5
        assert [t for t, _ in lp.top] == list(np.argsort(-ref[r])[:5])
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True) and all(v <= 0.0 for v in vals)
        assert np.allclose(vals, np.sort(ref[r])[::-1][:5], atol=1e-5)


def test_logprobs_without_top_and_for_a_peaked_row():
    x = np.full((1, V), -30.0, dtype=np.float32)
    x[0, 4] = 30.0
    toks, lps = sample(x, _states(1, logprobs=True, temperature=0.0))
    assert toks == [4] and lps[0].top == [] and lps[0].logprob <= 0.0


def test_prompt_logprobs():
    x = _logits(6)
    nxt = [5, 9, 0, 999, 3]
    out = prompt_logprobs(x, nxt, k=3)
    ref = log_softmax(x)
    assert [o.token_id for o in out] == nxt
    for i, o in enumerate(out):
        assert o.logprob == pytest.approx(ref[i, nxt[i]], abs=1e-5)
        assert [t for t, _ in o.top] == list(np.argsort(-ref[i])[:3])
    assert all(o.top == [] for o in prompt_logprobs(x, nxt, k=0))
    with pytest.raises(ValueError):
        prompt_logprobs(x, list(range(7)), k=1)


def test_non_finite_rows_do_not_crash():
    x = np.full((2, 8), -np.inf, dtype=np.float32)
    x[1, 3] = 0.0
    toks, _ = sample(x, _states(2, seed=0))
    assert toks[1] == 3 and 0 <= toks[0] < 8


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError):
        sample(_logits(2), _states(3))


def test_default_batch_is_fast():
    # Loose on purpose (typical: a few ms): the machine is shared, this only catches a slow path.
    x = _logits(16, vocab=49152)
    states = _states(16)
    sample(x, states)
    best = min(_timed(lambda: sample(x, states)) for _ in range(5))
    assert best < 0.05


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _reference_keep(x: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    """Tokens a plain sort-based implementation keeps (HF warper order)."""
    probs = np.exp(log_softmax(x / temperature))
    order = np.argsort(-probs)
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    n = int(np.searchsorted(np.cumsum(kept), top_p - 1e-12)) + 1 if top_p < 1 else len(keep)
    keep = keep[:n]
    return {int(t) for t in keep if probs[t] >= min_p * probs[keep[0]]}


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 0.9, 0.0), (0.7, 50, 0.95, 0.0), (1.3, 0, 0.5, 0.05), (1.0, 20, 1.0, 0.1), (2.0, 0, 0.99, 0.0),
])
def test_truncation_matches_a_sort_based_reference(temperature, top_k, top_p, min_p):
    from hearth.runtime.sampling import _truncate
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    for x in _logits(5, vocab=3000, seed=11):
        p = np.exp((x - x.max()) / np.float32(temperature)).astype(np.float32)
        _truncate(p, params)
        assert set(np.flatnonzero(p).tolist()) == _reference_keep(x.astype(np.float64), temperature,
                                                                  top_k, top_p, min_p)
