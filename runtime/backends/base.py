"""The contract between the engine core and a model backend.

The engine core (scheduler, sampler, detokenizer, stop checks) is shared; a backend only
tokenizes, owns the KV memory of its sequences, and runs one batched forward per step.
Logits cross this seam as float32 NumPy arrays so the llama.cpp path never needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
    vocab_size: int
    """Width of the logits rows (may exceed the number of real tokens)."""
    eos_token_ids: frozenset[int]
    """Every id that ends a turn for this model (eos, <|im_end|>, <|eot_id|> ...)."""
    bos_token: str
    eos_token: str
    chat_template: str | None

    special_tokens: dict[str, int]
    """Text -> id of the control tokens (<|im_start|>, BOS, EOS ...): what parse_special matches."""

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Text to ids; add_special_tokens adds BOS where the model expects one; parse_special=False
        keeps control-token text as plain text. runtime/prompt.py is the one caller that matters."""

    def wrap_special(self, ids: list[int]) -> list[int]:
        """ids with what add_special_tokens=True puts around an encoded text (BOS ...)."""

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text, special tokens skipped. Must be the same function the detokenizer streams."""

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token as decode joins them (b"" for special tokens); guided decoding and
        logprobs' `bytes` need them, since a multi-byte character may be split over tokens."""

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> str:
        """Render messages (and tools) with the model's chat template in a sandbox."""


@dataclass
class SeqWork:
    """One sequence's share of a forward step."""

    seq_id: int
    token_ids: list[int]
    """Tokens to feed this step: a prefill chunk or the one last sampled token."""
    start_pos: int
    """Absolute position of token_ids[0]; the KV of positions [0, start_pos) is already in cache."""
    all_logits: bool = False
    """Return logits for every fed token (prompt logprobs) instead of only the last."""
    need_logits: bool = True
    """False for a prefill chunk that does not end the prompt: no logits wanted at all."""
    alone: bool = False
    """A whole prompt from position 0 to score (prompt logprobs, no output): compute it as if nothing
    else ran and the cache were empty, so its logits never depend on the batch or on cached KV. Its
    KV need not stay in cache."""


class KVManager(Protocol):
    """Owns the KV memory of a backend: admission, prefix reuse and release."""

    def match_prefix(self, seq_id: int, token_ids: Sequence[int]) -> int:
        """Attach cached KV for the longest reusable prefix of token_ids to seq_id.

        Returns how many leading tokens need no recomputation (always < len(token_ids),
        so at least one token is fed and produces logits)."""

    def reuse_boundary(self, num_tokens: int) -> int:
        """How many leading tokens of a num_tokens-token prompt a repeat of it would take from the
        cache (0: none, or no need to split). The scheduler ends a prefill chunk there, so a first
        run and its repeats compute the prompt's last chunk in the same shape."""

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        """Make room so seq_id can hold num_tokens tokens in total. False (and no change) if memory is short."""

    def free(self, seq_id: int, token_ids: Sequence[int] | None = None) -> None:
        """Release seq_id. With token_ids (the tokens whose KV is in cache), keep them reusable as a prefix."""

    def num_active(self) -> int:
        """Sequences currently holding KV (cached prefixes not counted)."""

    def usage(self) -> float:
        """Fraction of KV memory in use by active sequences, 0..1."""

    def capacity_tokens(self) -> int:
        """Total tokens the KV memory can hold."""


class Backend(Protocol):
    tokenizer: Tokenizer
    max_model_len: int
    kv: KVManager
    name: str

    def forward(self, work: list[SeqWork]) -> list[np.ndarray | None]:
        """Run one batched step. Per item: None if not need_logits, (V,) float32 logits of the last
        fed token, or (len(token_ids), V) with all_logits. KV for the fed tokens is written."""

    def close(self) -> None:
        """Free native resources."""
