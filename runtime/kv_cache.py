"""Paged KV memory: fixed-size blocks, per-sequence block tables, and prefix caching.

The block manager is bookkeeping only (no tensors): the transformers backend stores K/V in flat
slot tensors and asks this manager which slots a sequence owns. A full block is identified by the
hash chain of its tokens, so a later prompt with the same prefix (a shared system prompt) reuses
the blocks instead of recomputing them. Freed blocks that carry a hash stay cached (LRU) until
their memory is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class _Block:
    id: int
    ref: int = 0
    key: tuple | None = None
    """(parent_hash, tokens) of a full block whose KV is computed; None while partial."""


@dataclass
class _SeqTable:
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    """Chain hash of each registered full block, in order."""
    tokens: list[int] = field(default_factory=list)
    """Tokens whose KV is written, as far as the backend told us (for registering blocks)."""


class BlockManager:
    """Implements the KVManager contract (runtime.backends.base) over paged blocks."""

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_cache: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_cache = prefix_cache
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives low ids first
        self._cached: OrderedDict[int, None] = OrderedDict()  # ref==0 blocks with a key, LRU order
        self._by_hash: dict[int, int] = {}
        self._seqs: dict[int, _SeqTable] = {}
        self.hits = 0
        self.queries = 0

    # ---- the KVManager contract -------------------------------------------------------------
    def match_prefix(self, seq_id: int, token_ids: Sequence[int]) -> int:
        table = self._seqs.setdefault(seq_id, _SeqTable())
        if not self.prefix_cache or table.blocks:
            return 0
        bs = self.block_size
        n_full = (len(token_ids) - 1) // bs  # keep at least one token to feed
        parent = 0
        matched = 0
        self.queries += n_full
        for i in range(n_full):
            toks = tuple(token_ids[i * bs:(i + 1) * bs])
            h = hash((parent, toks))
            bid = self._by_hash.get(h)
            if bid is None or self._blocks[bid].key != (parent, toks):
                break
            blk = self._blocks[bid]
            if blk.ref == 0:
                self._cached.pop(bid, None)
            blk.ref += 1
            table.blocks.append(bid)
            table.hashes.append(h)
            parent = h
            matched += bs
        table.tokens.extend(token_ids[:matched])
        self.hits += matched // bs
        return matched

    def reuse_boundary(self, num_tokens: int) -> int:
        """Whole blocks only, one token left to feed: what match_prefix gives a repeat of a prompt."""
        return (num_tokens - 1) // self.block_size * self.block_size if self.prefix_cache else 0

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        table = self._seqs.setdefault(seq_id, _SeqTable())
        need = -(-num_tokens // self.block_size) - len(table.blocks)
        if need <= 0:
            return True
        if need > len(self._free) + len(self._cached):
            return False
        for _ in range(need):
            table.blocks.append(self._take_block())
        return True

    def free(self, seq_id: int, token_ids: Sequence[int] | None = None) -> None:
        table = self._seqs.pop(seq_id, None)
        if table is None:
            return
        if token_ids is not None and self.prefix_cache:
            self._register(table, token_ids)
        for bid in table.blocks:
            blk = self._blocks[bid]
            blk.ref -= 1
            if blk.ref > 0:
                continue
            if blk.key is not None:
                self._cached[bid] = None
            else:
                self._free.append(bid)

    def num_active(self) -> int:
        return len(self._seqs)

    def usage(self) -> float:
        return 1.0 - (len(self._free) + len(self._cached)) / self.num_blocks

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    # ---- used by the backend ----------------------------------------------------------------
    def block_table(self, seq_id: int) -> list[int]:
        return self._seqs[seq_id].blocks

    def note_written(self, seq_id: int, start_pos: int, token_ids: Sequence[int]) -> None:
        """KV for token_ids at positions start_pos.. is now in cache: register the sequence's
        newly full blocks so concurrent requests with the same prefix can share them."""
        table = self._seqs.get(seq_id)
        if table is None or not self.prefix_cache:
            return
        del table.tokens[start_pos:]
        table.tokens.extend(token_ids)
        self._register(table, table.tokens)

    def free_blocks(self) -> int:
        return len(self._free) + len(self._cached)

    # ---- internals --------------------------------------------------------------------------
    def _take_block(self) -> int:
        if self._free:
            bid = self._free.pop()
        else:
            bid, _ = self._cached.popitem(last=False)  # evict the least recently cached
            blk = self._blocks[bid]
            if blk.key is not None and self._by_hash.get(hash(blk.key)) == bid:
                del self._by_hash[hash(blk.key)]
            blk.key = None
        self._blocks[bid].ref = 1
        return bid

    def _register(self, table: _SeqTable, token_ids: Sequence[int]) -> None:
        bs = self.block_size
        n_full = min(len(token_ids) // bs, len(table.blocks))
        parent = table.hashes[-1] if table.hashes else 0
        for i in range(len(table.hashes), n_full):
            key = (parent, tuple(token_ids[i * bs:(i + 1) * bs]))
            h = hash(key)
            bid = table.blocks[i]
            blk = self._blocks[bid]
            if blk.key is None and h not in self._by_hash:
                blk.key = key
                self._by_hash[h] = bid
            table.hashes.append(h)
            parent = h
