"""Token sampling for the engine: penalties, logit bias, temperature, top-k, top-p, min-p, logprobs.

NumPy only, so the llama.cpp path runs without torch. The engine keeps one `SamplerState` per
sequence and calls `sample` once per decode step with the (B, V) logits of the whole batch:

    states = [SamplerState(params, prompt_ids) for params, prompt_ids in batch]
    tokens, logprobs = sample(logits, states)   # logits: (B, V) float32
    for state, tok in zip(states, tokens):
        state.append(tok)

Order per row: repetition penalty -> presence/frequency penalty -> logit_bias -> grammar mask
(guided decoding: disallowed tokens -> -inf) -> greedy argmax, or temperature -> top_k -> top_p ->
min_p -> a draw from the sequence's own generator.
Logprobs always come from the raw logits (the model's distribution), not the processed ones.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .guided import GuidedMatcher, apply_guidance
from .types import SamplingParams, TokenLogprob

_seed_source = np.random.default_rng()
"""Seeds the generator of every sequence that asks for no seed."""

_UINT64 = (1 << 64) - 1
_DRAW_BLOCK = 256
"""Tokens per block in `_crossing`."""
_NUCLEUS_PROBE = (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)
"""Relative probability floors tried before sorting the whole row for top_p."""
_LOGPROB_CHUNK = 64
"""Rows per chunk in `prompt_logprobs`, so a long prompt never needs a (T, V) float64 temporary."""


class _TokenCounter:
    """Token id -> count, mirrored in NumPy arrays that grow by doubling, so each append is O(1)
    and the sampler gets (ids, counts) without rebuilding anything."""

    def __init__(self, token_ids: Sequence[int] = ()):
        uniq, counts = np.unique(np.asarray(token_ids, dtype=np.int64), return_counts=True)
        capacity = max(16, 2 * len(uniq))
        self._ids = np.zeros(capacity, dtype=np.int64)
        self._counts = np.zeros(capacity, dtype=np.float32)
        self._ids[:len(uniq)] = uniq
        self._counts[:len(uniq)] = counts
        self._slot = {int(t): i for i, t in enumerate(uniq)}
        self._n = len(uniq)

    def add(self, token_id: int) -> None:
        i = self._slot.get(token_id)
        if i is None:
            if self._n == len(self._ids):
                self._ids = np.concatenate([self._ids, np.zeros_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.zeros_like(self._counts)])
            i = self._n
            self._slot[token_id] = i
            self._ids[i] = token_id
            self._n += 1
        self._counts[i] += 1.0

    def __len__(self) -> int:
        return self._n

    def count(self, token_id: int) -> int:
        i = self._slot.get(token_id)
        return 0 if i is None else int(self._counts[i])

    @property
    def ids(self) -> np.ndarray:
        return self._ids[:self._n]

    @property
    def counts(self) -> np.ndarray:
        return self._counts[:self._n]


class SamplerState:
    """What the sampler remembers about one sequence: its generator and the tokens it has seen.

    `index` tells apart the choices of one request (n > 1): the same seed with a different index
    gives a different but still reproducible stream. `guide` (guided decoding) masks the tokens its
    grammar disallows and consumes each appended token."""

    def __init__(self, params: SamplingParams, prompt_token_ids: Sequence[int] = (), index: int = 0,
                 guide: GuidedMatcher | None = None):
        self.params = params
        self.guide = guide
        if params.seed is not None:
            seed_seq = np.random.SeedSequence(params.seed & _UINT64, spawn_key=(index,))
        else:
            seed_seq = np.random.SeedSequence(int(_seed_source.integers(0, 2**63)))
        self.generator = np.random.default_rng(seed_seq)
        self.output_counts = _TokenCounter()
        """Generated token id -> count, for the presence and frequency penalties."""
        # Only a sequence with a repetition penalty pays for the set of prompt ids.
        self.seen = _TokenCounter(prompt_token_ids) if params.repetition_penalty != 1.0 else None
        """Ids in prompt + output (repetition_penalty only), else None."""
        self.num_generated = 0
        bias = params.logit_bias
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        self._additive = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0

    def append(self, token_id: int) -> None:
        """Record the token chosen for this sequence."""
        token_id = int(token_id)
        self.output_counts.add(token_id)
        if self.seen is not None:
            self.seen.add(token_id)
        self.num_generated += 1
        if self.guide is not None:
            self.guide.consume(token_id)  # a refused token leaves guide.error set; the engine ends the sequence

    @property
    def modifies_logits(self) -> bool:
        """True when penalties, bias or a grammar change this row's logits (now, given what was seen)."""
        return (self.guide is not None or self.seen is not None or len(self._bias_ids) > 0
                or (self._additive and len(self.output_counts) > 0))

    def apply(self, row: np.ndarray) -> None:
        """Apply repetition, presence/frequency penalty and logit bias to one (V,) row in place."""
        p = self.params
        vocab = row.shape[0]
        if self.seen is not None and len(self.seen):
            ids = self.seen.ids
            ids = ids[ids < vocab]
            vals = row[ids]
            # CTRL/HF: dividing a negative logit would make the token more likely, so multiply it.
            row[ids] = np.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if self._additive and len(self.output_counts):
            ids, counts = self.output_counts.ids, self.output_counts.counts
            keep = ids < vocab
            row[ids[keep]] -= p.presence_penalty + p.frequency_penalty * counts[keep]
        if len(self._bias_ids):
            keep = self._bias_ids < vocab
            row[self._bias_ids[keep]] += self._bias_values[keep]


def sample(logits: np.ndarray, states: Sequence[SamplerState]
           ) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of `logits` (B, V) with that row's state.

    Returns the tokens and, per row, a TokenLogprob when its params ask for logprobs (else None).
    The states are not updated: the caller appends the token once it accepts it."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(states):
        raise ValueError(f"logits must be (B, V) with B == len(states) == {len(states)}, "
                         f"got shape {logits.shape}")
    batch, vocab = logits.shape
    work = logits
    modified = [i for i, s in enumerate(states) if s.modifies_logits]
    if modified:
        work = logits.copy()  # the raw logits stay untouched for logprobs
        for i in modified:
            states[i].apply(work[i])
        guided = [i for i in modified if states[i].guide is not None]
        if guided:  # the grammar mask goes last: no bias can revive a disallowed token
            apply_guidance(work, guided, [states[i].guide for i in guided])

    tokens = np.zeros(batch, dtype=np.int64)
    greedy = [i for i, s in enumerate(states) if s.params.greedy]
    if greedy:
        tokens[greedy] = _rows(work, greedy).argmax(axis=1)
    drawn = [i for i, s in enumerate(states) if not s.params.greedy]
    if drawn:
        tokens[drawn] = _sample_rows(_rows(work, drawn), [states[i] for i in drawn])

    logprobs: list[TokenLogprob | None] = [None] * batch
    wanted = [i for i, s in enumerate(states) if s.params.logprobs]
    if wanted:
        ks = [states[i].params.top_logprobs for i in wanted]
        for i, lp in zip(wanted, _logprobs_of(_rows(logits, wanted), tokens[wanted], ks)):
            logprobs[i] = lp
    return [int(t) for t in tokens], logprobs


def prompt_logprobs(logits: np.ndarray, next_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Logprob of next_ids[i] under logits row i (T, V), with the top-k alternatives of each row.

    Uses the first len(next_ids) rows; the engine passes prompt[1:] against the prompt's logits."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or len(next_ids) > logits.shape[0]:
        raise ValueError(f"need (T, V) logits with T >= {len(next_ids)}, got shape {logits.shape}")
    ids = np.asarray(next_ids, dtype=np.int64)
    out: list[TokenLogprob] = []
    for start in range(0, len(ids), _LOGPROB_CHUNK):
        end = min(start + _LOGPROB_CHUNK, len(ids))
        out.extend(_logprobs_of(logits[start:end], ids[start:end], [k] * (end - start)))
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (reference for tests and callers that want a whole row)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _rows(a: np.ndarray, idx: list[int]) -> np.ndarray:
    """a[idx], without the copy when idx is every row in order (the common all-alike batch)."""
    return a if len(idx) == a.shape[0] else a[idx]


def _sample_rows(x: np.ndarray, states: list[SamplerState]) -> np.ndarray:
    """Temperature -> top_k -> top_p -> min_p -> draw, for the (R, V) processed rows of non-greedy states."""
    temps = np.array([s.params.temperature for s in states], dtype=np.float32)
    row_max = x.max(axis=1)
    finite = np.isfinite(row_max)  # False for a row of all -inf, or with +inf or NaN
    # Unnormalised probabilities with the top token at exactly 1: min_p needs no division.
    p = x - np.where(finite, row_max, np.float32(0))[:, None]  # (R, V)
    if (temps != 1.0).any():
        p *= (1.0 / temps)[:, None]
    np.exp(p, out=p)
    out = np.empty(len(states), dtype=np.int64)
    for r, s in enumerate(states):
        if not finite[r]:  # no distribution to draw from: fall back to the argmax
            out[r] = int(np.argmax(np.nan_to_num(x[r], nan=-np.inf)))
            continue
        _truncate(p[r], s.params)
        out[r] = _draw(p[r], s.generator.random())
    return out


def _truncate(p: np.ndarray, params: SamplingParams) -> None:
    """top_k -> top_p -> min_p on one (V,) row of unnormalised probabilities whose top is 1, in place."""
    vocab = p.shape[0]
    if 0 < params.top_k < vocab:
        kth = np.partition(p, vocab - params.top_k)[vocab - params.top_k]
        p[p < kth] = 0.0  # ties with the k-th value are kept, as HF does
    if params.top_p < 1.0:
        p[p < _nucleus_floor(p, params.top_p)] = 0.0
    if params.min_p > 0.0:
        p[p < params.min_p] = 0.0  # the top token is 1, so this is min_p * p_max


def _nucleus_floor(p: np.ndarray, top_p: float) -> float:
    """Smallest probability kept by top_p: the sorted mass up to and including it reaches top_p."""
    target = top_p * float(p.sum())
    # The nucleus is usually a few tokens: sort only those above the highest floor whose mass
    # already reaches top_p (a mask and a masked sum cost far less than sorting the vocabulary).
    vals = p
    for rel in _NUCLEUS_PROBE:
        above = p >= rel
        if float(p.sum(where=above)) >= target:
            vals = p[above]
            break
    vals = np.sort(vals)[::-1]
    frac = target / float(vals.sum())
    return float(vals[_crossing(vals, min(frac, 1.0), side="left")])


def _draw(p: np.ndarray, u: float) -> int:
    """Index drawn with probability proportional to p (V,), p >= 0, u uniform in [0, 1).
    A token with p == 0 is never returned."""
    return _crossing(p, u, side="right")


def _crossing(v: np.ndarray, frac: float, side: str) -> int:
    """First index whose running sum of v (>= 0) passes frac * sum(v): '>' with side="right", '>='
    with side="left", as in np.searchsorted. Never an index with v == 0.

    Sums blocks first and then runs through one block: a cumsum over the whole vocabulary costs
    more than everything else in a step."""
    starts = np.arange(0, v.shape[0], _DRAW_BLOCK)
    block_cum = np.cumsum(np.add.reduceat(v, starts), dtype=np.float64)
    target = frac * block_cum[-1]
    b = int(np.searchsorted(block_cum, target, side=side))
    if b >= len(starts):  # target rounded up to the total: the last token that has mass
        return int(np.flatnonzero(v > 0)[-1])
    lo = int(starts[b])
    block = v[lo:lo + _DRAW_BLOCK]
    before = block_cum[b - 1] if b > 0 else 0.0
    j = int(np.searchsorted(np.cumsum(block, dtype=np.float64), target - before, side=side))
    if j >= len(block):  # rounding between the two sums: the block's last token with mass
        j = int(np.flatnonzero(block > 0)[-1])
    return lo + j


def _logprobs_of(raw: np.ndarray, chosen: np.ndarray, ks: Sequence[int]) -> list[TokenLogprob]:
    """TokenLogprob per row of raw logits (R, V): the chosen token's logprob and the top ks[r]."""
    m = raw.max(axis=1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(raw - m).sum(axis=1, dtype=np.float64))  # (R,)
    kmax = max(ks, default=0)
    top_idx = None
    if kmax > 0:
        kk = min(kmax, raw.shape[1])
        top_idx = np.argpartition(raw, raw.shape[1] - kk, axis=1)[:, raw.shape[1] - kk:]  # (R, kk)
    out = []
    for r, k in enumerate(ks):
        tok = int(chosen[r])
        lp = min(0.0, float(raw[r, tok]) - lse[r])
        top: list[tuple[int, float]] = []
        if k > 0 and top_idx is not None:
            idx = top_idx[r]
            # Descending logprob, ties broken by id so the order is deterministic.
            idx = idx[np.lexsort((idx, -raw[r, idx]))][:k]
            top = [(int(t), min(0.0, float(raw[r, t]) - lse[r])) for t in idx]
        out.append(TokenLogprob(token_id=tok, logprob=lp, top=top))
    return out
