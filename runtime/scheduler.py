"""Iteration-level scheduling: which sequences run this step, and how many tokens each.

Every step the scheduler hands out a token budget: first one token to each running sequence that
is decoding, then prefill chunks (a long prompt is split over several steps so it never stalls the
streams already running), then new sequences in arrival order while KV memory admits their whole
prompt. When a decoding sequence cannot grow, the most recently admitted one is preempted: its KV
is freed and it is recomputed later, keeping the tokens it already produced.

Two rules keep outputs reproducible. A prompt chunk never crosses the point where a repeat of the
same prompt would resume from the prefix cache (`KVManager.reuse_boundary`), so the first run and
its repeat compute the prompt's last chunk, and so its first sampled logits, alike. A scoring
sequence (prompt logprobs, no output) takes its whole prompt in one step, which the backend
computes alone, so its logprobs do not depend on what else runs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .backends.base import KVManager


@dataclass(eq=False)
class Sequence:
    """One choice of one request as the engine tracks it."""

    seq_id: int
    request_id: str
    index: int
    prompt_ids: list[int]
    max_tokens: int
    prompt_logprobs: bool = False
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens (prompt + output) whose KV is in cache."""
    num_cached: int = 0
    """Prompt tokens taken from the prefix cache on first admission (usage.cached_tokens)."""
    wait_for: "Sequence | None" = None
    """A sibling (same prompt, n > 1) whose prefill should finish first so this one hits the cache."""
    preempted: bool = False
    state: Any = None
    """Engine-side per-sequence state (sampler, detokenizer, output sink)."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        return (self.prompt_ids[start:] if start < p else []) + self.output_ids[max(0, start - p):end - p]

    @property
    def scoring(self) -> bool:
        """Prompt logprobs only (lm-eval's loglikelihood): computed alone, never from the cache."""
        return self.prompt_logprobs and self.max_tokens == 0

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_tokens - 1 or self.num_computed == 0


@dataclass
class ScheduledItem:
    seq: Sequence
    num_tokens: int


class Scheduler:
    def __init__(self, kv: KVManager, max_num_seqs: int = 32, max_num_batched_tokens: int = 512,
                 prefix_cache: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefix_cache = prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, cache_tokens: bool = True) -> None:
        """Drop a finished or aborted sequence and release its KV (keeping it as a prefix if asked)."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.seq_id, seq.token_slice(0, seq.num_computed) if cache_tokens else None)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.kv.free(seq.seq_id, None)

    def schedule(self) -> list[ScheduledItem]:
        budget = self.max_num_batched_tokens
        items: list[ScheduledItem] = []
        # 1) decode steps for running sequences (oldest first), preempting the newest when KV is short
        for seq in list(self.running):
            if seq not in self.running or seq.prefilling:
                continue
            while not self.kv.allocate(seq.seq_id, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                items = [it for it in items if it.seq is not victim]
                if victim is seq:
                    break
            if seq in self.running and budget > 0:
                items.append(ScheduledItem(seq, 1))
                budget -= 1
        # 2) continue prompts already admitted (chunked prefill)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilling:
                n = self._chunk(seq, budget)
                items.append(ScheduledItem(seq, n))
                budget -= n
        # 3) admit new sequences while the budget, the sequence cap and KV memory allow
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            first = seq.wait_for
            if first is not None and first.num_computed < len(first.prompt_ids) \
                    and first.state is not None and not first.state.finished:
                skipped.append(seq)
                continue
            ids = seq.token_slice(0, seq.num_tokens)
            matched = 0
            if self.prefix_cache and not seq.prompt_logprobs:
                matched = self.kv.match_prefix(seq.seq_id, ids)
            if not self.kv.allocate(seq.seq_id, seq.num_tokens):
                self.kv.free(seq.seq_id, None)
                self.waiting.appendleft(seq)
                break  # memory is short: keep arrival order, try again next step
            if not seq.preempted:
                seq.num_cached = matched
            seq.num_computed = matched
            self.running.append(seq)
            n = self._chunk(seq, budget)
            items.append(ScheduledItem(seq, n))
            budget -= n
        for seq in reversed(skipped):
            self.waiting.appendleft(seq)
        return items

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Tokens to feed seq this step: up to the budget, but a scoring prompt whole, and never
        across the prefix-cache reuse boundary of the prompt."""
        end = seq.num_tokens if seq.scoring else min(seq.num_tokens, seq.num_computed + budget)
        if self.prefix_cache and not seq.prompt_logprobs:
            cut = self.kv.reuse_boundary(len(seq.prompt_ids))
            if seq.num_computed < cut < end:
                end = cut
        return end - seq.num_computed

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.kv.free(seq.seq_id, seq.token_slice(0, seq.num_computed))
        seq.num_computed = 0
        seq.preempted = True
        self.waiting.appendleft(seq)
