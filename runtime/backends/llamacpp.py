"""llama.cpp backend: GGUF models through llama-cpp-python's low-level C API.

    from hearth.runtime.backends.base import SeqWork
    from hearth.runtime.backends.llamacpp import LlamaCppBackend
    backend = LlamaCppBackend("model.gguf", n_ctx=4096, n_seq_max=32)
    ids = backend.tokenizer.encode("The capital of France is")
    logits = backend.forward([SeqWork(seq_id=7, token_ids=ids, start_pos=0)])[0]  # (V,) float32
    backend.kv.free(7)

Each engine step is one `llama_decode` over a batch that mixes every running sequence (prefill
chunks and decode tokens), each token tagged with its sequence's llama seq id. The KV lives in
llama.cpp's *unified* cache: one pool of n_ctx cells shared by all sequences, so a prefix copied
with `llama_memory_seq_cp` shares cells with its source instead of duplicating them.

On CPU the backend is batch-invariant: a sequence's logits are bit-identical whatever else shares
its batches, so batched requests equal the same requests run alone. That takes flash attention
on ggml's per-row kernel (ubatches of 2..63 tokens, see LlamaCppBackend.__init__) and cells kept
in position order (no holes under running sequences, see LlamaCppKV).

Only numpy and llama_cpp are imported: no torch, no transformers (the offline edge app counts on
it). One thread drives a backend: forward and the KV calls are not meant to run concurrently.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Sequence

from .llamacpp_threads import apply_openmp_defaults

apply_openmp_defaults()  # libgomp reads how its threads wait once, as llama_cpp loads it
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from ..checkpoint import inspect_checkpoint
from ..errors import HearthError, ModelLoadError, UnsupportedModelError
from .base import SeqWork
from .llamacpp_tokenizer import LlamaCppTokenizer

log = logging.getLogger("hearth.llamacpp")


class LlamaDecodeError(HearthError, RuntimeError):
    """llama_decode failed; `code` is its return value (1: no KV slot, 2: aborted, <0: bad batch)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class KVCacheFullError(HearthError, RuntimeError):
    """A forward needed KV cells (or a llama seq id) that allocate() could not provide."""


# ---- process-wide llama.cpp setup -----------------------------------------------------------
_FA_TILE_ROWS = 64  # ggml's CPU flash attention goes tiled (not batch-invariant) from 64 rows
_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids
_Q8_BLOCK = 32  # values per q8_0 block (ggml's QK8_0)


def _head_dim(model) -> int:
    """The attention head size of a loaded llama.cpp model (embedding width over heads)."""
    heads = llama_cpp.llama_model_n_head(model)
    return llama_cpp.llama_model_n_embd(model) // heads if heads else 0
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml: 1 debug, 2 info, 3 warn, 4 error, 5 cont
_last_level = logging.DEBUG
_initialized = False


@llama_cpp.llama_log_callback
def _on_llama_log(level: int, text: bytes, _user: object) -> None:
    # llama.cpp prints everything to stderr by default; route it to logging (info -> debug).
    global _last_level
    lvl = _last_level if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
    _last_level = lvl
    if log.isEnabledFor(lvl):
        log.log(lvl, "%s", text.decode("utf-8", errors="replace").rstrip("\n"))


def _init_llama() -> None:
    global _initialized
    if not _initialized:
        llama_cpp.llama_log_set(_on_llama_log, None)
        llama_cpp.llama_backend_init()
        _initialized = True


def _free_native(batch: llama_cpp.llama_batch, ctx: object, model: object, more: list) -> None:
    for b, c in more:  # other contexts of the model (scoring), before the model
        llama_cpp.llama_batch_free(b)
        llama_cpp.llama_free(c)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


def _cpu_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # respects taskset/cgroup CPU limits
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


# ---- KV bookkeeping -------------------------------------------------------------------------
@dataclass(eq=False)
class _Run:
    """KV cells of positions [start, end), shared by every llama seq id in `holders`.
    A run exists once reserved, before its tokens are decoded."""

    start: int
    end: int
    holders: set[int]


@dataclass(eq=False)
class _Seq:
    lid: int
    """The llama seq id, in [0, n_seq_max)."""
    tokens: list[int] = field(default_factory=list)
    """Tokens whose KV is written, by position."""
    runs: list[_Run] = field(default_factory=list)
    """Cover positions [0, reserved) in order; runs past len(tokens) are its own reservation."""

    @property
    def reserved(self) -> int:
        return self.runs[-1].end if self.runs else 0


class LlamaCppKV:
    """The KVManager contract (runtime.backends.base) over llama.cpp's unified KV cache.

    Engine seq ids map to llama seq ids in [0, n_seq_max). Memory is counted in cells exactly as
    llama.cpp holds them: a cell shared by several sequences (after seq_cp) counts once, and a
    cell stays used until no sequence holds it. Finished sequences freed with their token ids
    stay as cached prefixes (LRU, each keeping its llama seq id) until room is needed.

    Other released KV is removed at once when nothing else runs, else when room is needed or the
    last active sequence ends: llama.cpp would fill the holes with running sequences' next tokens,
    out of position order, and ggml's CPU flash attention sums cells in cell order (fp16), so
    their logits would drift from a run alone (up to ~0.6 on the default model)."""

    def __init__(self, memory: object, n_ctx: int, n_seq_max: int, prefix_cache: bool = True,
                 defer_release: bool = True, cache_budget: int | None = None):
        self._mem = memory
        # Cells that cached prefixes may hold beyond what active sequences use. llama.cpp's attention
        # spans every occupied cell of the shared pool, so a pool full of old prefixes slows every
        # later decode step (measured: 0.68x single-stream speed with 4043 of 4096 cells cached).
        self.cache_budget = n_ctx // 4 if cache_budget is None else cache_budget
        self.defer_release = defer_release
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.prefix_cache = prefix_cache
        self._active: dict[int, _Seq] = {}  # engine seq id -> sequence
        self._cached: OrderedDict[int, _Seq] = OrderedDict()  # llama seq id -> prefix, LRU first
        self._retired: list[_Seq] = []  # released while others ran; dropped before cached ones
        self._by_lid: dict[int, _Seq] = {}
        self._free_lids = list(range(n_seq_max - 1, -1, -1))  # pop() gives low ids first
        self.ctx: object | None = None
        """The llama context (set by the backend): `_settle` saves and restores sequences through it."""
        self._holes = False
        self.num_settles = 0

    # ---- the KVManager contract ---------------------------------------------------------------
    def match_prefix(self, seq_id: int, token_ids: Sequence[int]) -> int:
        if not self.prefix_cache or len(token_ids) < 2:
            return 0
        seq = self._active.get(seq_id)
        if seq is None:
            self._settle()
        if seq is not None and seq.tokens:  # already holds KV: keep the part that still matches
            keep = min(_common_prefix(seq.tokens, token_ids), len(token_ids) - 1)
            self._truncate(seq, keep)
            return keep
        best, best_len = None, 0
        for cand in (*self._cached.values(), *self._active.values()):
            if cand is not seq and len(cand.tokens) > best_len:
                n = _common_prefix(cand.tokens, token_ids)
                if n > best_len:
                    best, best_len = cand, n
        reuse = min(best_len, len(token_ids) - 1)
        if best is None or reuse <= 0:
            return 0
        if seq is None:
            if not self._free_lids and not self._evict_one(keep=best):
                return 0
            seq = self._new_seq(seq_id)
        reserved = seq.reserved
        self._release(seq, 0)  # drop any reservation made before the match
        llama_cpp.llama_memory_seq_cp(self._mem, best.lid, seq.lid, 0, reuse)
        self._split(best, reuse)
        seq.runs = [r for r in best.runs if r.end <= reuse]
        for r in seq.runs:
            r.holders.add(seq.lid)
        if reserved > reuse:
            seq.runs.append(_Run(reuse, reserved, {seq.lid}))
        seq.tokens = list(token_ids[:reuse])
        if best.lid in self._cached:
            self._cached.move_to_end(best.lid)
        return reuse

    def reuse_boundary(self, num_tokens: int) -> int:
        """No split. A batch-invariant backend computes a row alike in any ubatch, so a repeat's lone
        last token equals the first run's; without that mode splitting would not help: a lone token's
        attention is split across threads by the size of the occupied KV, which a repeat changes."""
        return 0

    def allocate(self, seq_id: int, num_tokens: int) -> bool:
        seq = self._active.get(seq_id)
        if seq is None:
            self._settle()
        need = num_tokens - (seq.reserved if seq else 0)
        if seq is not None and need <= 0:
            return True
        if num_tokens > self.n_ctx:
            return False
        # Plan the LRU evictions first so that a refusal changes nothing.
        short = self._used_cells() + need - self.n_ctx
        need_lid = seq is None and not self._free_lids
        victims: list[_Seq] = []
        gone: set[int] = set()
        for cand in (*self._retired, *self._cached.values()):
            if short <= 0 and not need_lid:
                break
            victims.append(cand)
            gone.add(cand.lid)
            short = self._used_cells(ignore=gone) + need - self.n_ctx
            need_lid = False
        if short > 0 or need_lid:
            return False
        for v in victims:
            self._drop(v)
        if seq is None:
            seq = self._new_seq(seq_id)
        last = seq.runs[-1] if seq.runs else None
        if last is not None and last.holders == {seq.lid}:
            last.end = num_tokens
        else:
            seq.runs.append(_Run(seq.reserved, num_tokens, {seq.lid}))
        return True

    def free(self, seq_id: int, token_ids: Sequence[int] | None = None) -> None:
        seq = self._active.pop(seq_id, None)
        if seq is None:
            return
        keep = 0
        if token_ids is not None and self.prefix_cache:
            keep = _common_prefix(seq.tokens, token_ids)
        if keep == 0:
            self._retire(seq)
        else:
            self._truncate(seq, keep, reserve=False)
            self._cached[seq.lid] = seq
            for other in list(self._cached.values()):
                if other is seq:
                    continue
                common = _common_prefix(other.tokens, seq.tokens)
                if common == len(seq.tokens):  # an equal or longer prefix is already cached
                    self._retire(seq)
                    self._cached.move_to_end(other.lid)
                    break
                if common == len(other.tokens):  # made redundant by this longer one
                    self._retire(other)
            self._trim_cache()
        if not self._active:
            for r in list(self._retired):
                self._drop(r)

    def num_active(self) -> int:
        return len(self._active)

    def usage(self) -> float:
        runs = {id(r): r for s in self._active.values() for r in s.runs}
        return sum(r.end - r.start for r in runs.values()) / self.n_ctx

    def capacity_tokens(self) -> int:
        return self.n_ctx

    # ---- inspection (tests, metrics) ----------------------------------------------------------
    def num_cached(self) -> int:
        """Cached prefixes kept for reuse."""
        return len(self._cached)

    def used_cells(self) -> int:
        """Cells held or reserved by active, cached and released-but-not-yet-removed sequences."""
        return self._used_cells()

    def llama_seq_id(self, seq_id: int) -> int | None:
        """The llama seq id of an active engine sequence."""
        seq = self._active.get(seq_id)
        return seq.lid if seq else None

    def pos_max(self, llama_seq_id: int) -> int:
        """Largest position llama.cpp holds for a llama seq id; -1 when it holds none."""
        return llama_cpp.llama_memory_seq_pos_max(self._mem, llama_seq_id)

    def orphaned_kv(self) -> dict[int, int]:
        """{llama seq id: pos_max} for ids holding KV while owned by no active, cached or released
        sequence. Empty when the bookkeeping matches llama.cpp; and with nothing active, every
        non-cached sequence's KV is gone (pos_max == -1)."""
        out = {}
        for lid in range(self.n_seq_max):
            if lid not in self._by_lid and (p := self.pos_max(lid)) != -1:
                out[lid] = p
        return out

    # ---- used by the backend's forward --------------------------------------------------------
    def _prepare_feed(self, seq_id: int, start_pos: int, n: int) -> int:
        """Check that tokens for [start_pos, start_pos+n) can be fed; returns the llama seq id."""
        seq = self._active.get(seq_id)
        if seq is None or seq.reserved < start_pos + n:
            if not self.allocate(seq_id, start_pos + n):
                raise KVCacheFullError(f"no KV room for sequence {seq_id} up to position "
                                       f"{start_pos + n} (capacity {self.n_ctx} cells, "
                                       f"{self.n_seq_max} sequences)")
            seq = self._active[seq_id]
        if start_pos > len(seq.tokens):
            raise ValueError(f"sequence {seq_id}: start_pos {start_pos} skips positions; "
                             f"KV holds only {len(seq.tokens)} tokens")
        if start_pos < len(seq.tokens):  # the caller rewinds (e.g. rejected draft tokens)
            self._truncate(seq, start_pos)
        return seq.lid

    def _written(self, seq_id: int, token_ids: Sequence[int]) -> None:
        self._active[seq_id].tokens.extend(token_ids)

    # ---- internals ----------------------------------------------------------------------------
    def _new_seq(self, seq_id: int) -> _Seq:
        seq = _Seq(self._free_lids.pop())
        self._active[seq_id] = seq
        self._by_lid[seq.lid] = seq
        return seq

    def _used_cells(self, ignore: set[int] = frozenset()) -> int:
        runs = {id(r): r for s in self._by_lid.values() for r in s.runs}
        return sum(r.end - r.start for r in runs.values() if not r.holders <= ignore)

    def _split(self, seq: _Seq, pos: int) -> None:
        """Make `pos` a run boundary of seq (and of every sequence sharing the run cut there)."""
        for r in seq.runs:
            if r.start < pos < r.end:
                tail = _Run(pos, r.end, set(r.holders))
                r.end = pos
                for lid in r.holders:
                    runs = self._by_lid[lid].runs
                    runs.insert(runs.index(r) + 1, tail)
                return

    def _release(self, seq: _Seq, pos: int) -> None:
        """Stop holding the runs of positions >= pos (bookkeeping only)."""
        self._split(seq, pos)
        for r in seq.runs:
            if r.start >= pos:
                r.holders.discard(seq.lid)
        seq.runs = [r for r in seq.runs if r.start < pos]

    def _truncate(self, seq: _Seq, keep: int, reserve: bool = True) -> None:
        """Forget KV from position `keep` on; with reserve, keep the room as its own cells."""
        reserved = seq.reserved
        llama_cpp.llama_memory_seq_rm(self._mem, seq.lid, keep, -1)
        self._holes = True
        self._release(seq, keep)
        del seq.tokens[keep:]
        if reserve and reserved > keep:
            seq.runs.append(_Run(keep, reserved, {seq.lid}))

    def _retire(self, seq: _Seq) -> None:
        """Release seq's KV: now if nothing runs, else later (see the class docstring)."""
        self._cached.pop(seq.lid, None)
        seq.tokens = []  # never matched again
        if self._active and self.defer_release:
            self._retired.append(seq)
        else:
            self._drop(seq)

    def _drop(self, seq: _Seq) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, seq.lid, -1, -1)
        self._holes = True
        self._forget(seq)

    def _forget(self, seq: _Seq) -> None:
        """Bookkeeping of _drop, for KV already gone."""
        self._release(seq, 0)
        seq.tokens = []
        self._cached.pop(seq.lid, None)
        if seq in self._retired:
            self._retired.remove(seq)
        del self._by_lid[seq.lid]
        self._free_lids.append(seq.lid)

    def _settle(self) -> None:
        """With nothing active and holes left by released KV, rewrite the cached prefixes into cells
        0.. in position order, most recent first (llama.cpp's sequence state save and restore), so
        a new sequence's cells come after every cell it shares. llama.cpp fills holes first, even
        before a shared prefix, and its CPU attention sums cells in cell order (fp16): a repeat of
        a request would otherwise sum its prompt in another order than the first run and drift.
        Restored prefixes no longer share cells: the most recent ones that fit the budget stay."""
        if self._active or not self._holes or self.ctx is None:
            return
        self._holes = False
        self.num_settles += 1
        for seq in list(self._retired):
            self._forget(seq)
        keep, total = [], 0
        for seq in reversed(self._cached.values()):
            if not keep or total + len(seq.tokens) <= self.cache_budget:
                keep.append(seq)
                total += len(seq.tokens)
        saved = []
        for seq in keep:
            size = llama_cpp.llama_state_seq_get_size(self.ctx, seq.lid)
            buf = (ctypes.c_uint8 * size)()
            if llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, seq.lid) == size:
                saved.append((seq, buf, size))
        restored = set()
        llama_cpp.llama_memory_clear(self._mem, False)
        for seq, buf, size in saved:
            if llama_cpp.llama_state_seq_set_data(self.ctx, buf, size, seq.lid) == size:
                restored.add(seq.lid)
        for seq in list(self._cached.values()):
            if seq.lid in restored:
                for r in seq.runs:
                    r.holders.discard(seq.lid)
                seq.runs = [_Run(0, len(seq.tokens), {seq.lid})]
            else:
                llama_cpp.llama_memory_seq_rm(self._mem, seq.lid, -1, -1)  # a failed restore leaves none
                self._forget(seq)

    def _trim_cache(self) -> None:
        """Retire least recently used prefixes while they hold more than the budget of cells
        that no active sequence shares."""
        while len(self._cached) > 1:
            active = {s.lid for s in self._active.values()}
            runs = {id(r): r for s in self._cached.values() for r in s.runs}
            held = sum(r.end - r.start for r in runs.values() if not r.holders & active)
            if held <= self.cache_budget:
                return
            self._retire(next(iter(self._cached.values())))

    def _evict_one(self, keep: _Seq | None = None) -> bool:
        for cand in (*self._retired, *self._cached.values()):
            if cand is not keep:
                self._drop(cand)
                return True
        return False


# ---- the backend ----------------------------------------------------------------------------
class LlamaCppBackend:
    """Implements `Backend` (runtime.backends.base) for a GGUF model file (or a dir holding one)."""

    name = "llama.cpp"

    def __init__(self, model_path: str | os.PathLike, n_ctx: int = 4096, n_seq_max: int = 32,
                 n_threads: int | None = None, n_batch: int = 512, n_ubatch: int | None = None,
                 n_gpu_layers: int = 0,
                 flash_attn: bool | None = None, kv_type: str | None = None, use_mmap: bool = True,
                 prefix_cache: bool = True, batch_invariant: bool = True) -> None:
        """n_ctx: KV cells shared by all sequences (capped by the model's trained context);
        n_seq_max: most sequences (active + cached prefixes) at once; n_threads: CPU threads
        (default: all cores); n_batch: most tokens per llama_decode; n_ubatch: tokens per compute
        graph (default n_batch; 63 for batch invariance with f16/f32 KV, see _FA_TILE_ROWS);
        n_gpu_layers: layers offloaded (-1: all); flash_attn: None lets llama.cpp decide (on CPU:
        on); kv_type: "f16", "f32" or "q8_0" (default: q8_0 where batch_invariant applies and
        the head size is a multiple of 32, else f16); prefix_cache: keep finished sequences for reuse; batch_invariant: on CPU, a
        sequence's logits do not depend on its batch company, nor a repeat's on what the cache
        held (on by default: with q8_0 KV it costs little, see bench/RESULTS.md "Reproducibility";
        with f16/f32 KV it pads lone tokens and shrinks ubatches, ~45% of single-stream decode)."""
        if n_seq_max < 1 or n_batch < 1:
            raise ValueError("n_seq_max and n_batch must be positive")
        if kv_type is not None and kv_type not in _KV_TYPES:
            raise ValueError(f"kv_type must be one of {sorted(_KV_TYPES)}, got {kv_type!r}")

        info = inspect_checkpoint(model_path)
        if info.format != "gguf":
            raise ModelLoadError(f"{model_path} is a {info.format} checkpoint; "
                                 "the llama.cpp backend loads GGUF files")
        self.model_path = str(info.model_file)
        _init_llama()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_mmap = use_mmap
        model = llama_cpp.llama_model_load_from_file(self.model_path.encode(), mparams)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {self.model_path} (see the "
                                 "hearth.llamacpp log for the reason)")
        if llama_cpp.llama_model_has_encoder(model) or llama_cpp.llama_model_is_recurrent(model) \
                or llama_cpp.llama_model_is_hybrid(model):
            llama_cpp.llama_model_free(model)
            raise UnsupportedModelError("the llama.cpp backend supports decoder-only transformer "
                                        "GGUF models (no encoder-decoder, recurrent or hybrid)")
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        n_ctx = min(n_ctx, n_ctx_train) if n_ctx > 0 else n_ctx_train
        threads = n_threads or _cpu_cores()
        cpu_fa = batch_invariant and n_gpu_layers == 0 and flash_attn is not False
        if kv_type is None:  # q8_0 stores blocks of 32 values: a head size that is no multiple of 32 keeps f16
            kv_type = "q8_0" if cpu_fa and _head_dim(model) % _Q8_BLOCK == 0 else "f16"
        # Batch invariance on CPU: a sequence's logits must not depend on what else is in the
        # batch (batched requests equal the same requests run alone). Of ggml's three CPU flash
        # attention kernels only the per-row one is invariant, so keep every ubatch under 64
        # tokens (tiled kernel) and never let one hold a lone token (KV split across threads):
        # such a ubatch gets a throwaway token of a scratch sequence. The other two kernels take
        # only f16/f32 KV: a quantized KV (q8_0) always gets the per-row one, and needs neither.
        shaped = cpu_fa and kv_type in ("f16", "f32")
        if n_ubatch is None:
            n_ubatch = _FA_TILE_ROWS - 1 if shaped else n_batch
        n_ubatch = min(n_ubatch, n_batch)
        self._pad_lid = n_seq_max if shaped and n_ubatch > 1 else None
        max_seq = llama_cpp.llama_max_parallel_sequences() - (self._pad_lid is not None)
        if n_seq_max > max_seq:
            llama_cpp.llama_model_free(model)
            raise ValueError(f"n_seq_max must be at most {max_seq} here, got {n_seq_max}")

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_ubatch
        cparams.n_seq_max = n_seq_max + (self._pad_lid is not None)
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.kv_unified = True  # one cell pool: seq_cp shares cells, any seq may use all n_ctx
        cparams.no_perf = True
        cparams.type_k = cparams.type_v = _KV_TYPES[kv_type]
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO if flash_attn is None else
                                   llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else
                                   llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self._cparams = cparams
        self._score: list = []  # [(batch, context)] for SeqWork.alone, made on first use
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(f"llama.cpp could not create a context (n_ctx={n_ctx}, "
                                 f"n_seq_max={n_seq_max}) for {self.model_path}")
        self.n_batch = llama_cpp.llama_n_batch(ctx)
        self.n_ubatch = llama_cpp.llama_n_ubatch(ctx)
        self._mem = llama_cpp.llama_get_memory(ctx)
        batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._model, self._ctx, self._batch = model, ctx, batch
        self._finalizer = weakref.finalize(self, _free_native, batch, ctx, model, self._score)

        self.n_threads = threads
        self.n_ctx_train = n_ctx_train
        self.tokenizer = LlamaCppTokenizer(model)
        self.n_vocab = self.tokenizer.vocab_size
        # llama.cpp rounds n_ctx up to a multiple of 256; the scratch token needs one cell
        capacity = llama_cpp.llama_n_ctx(ctx) - (self._pad_lid is not None)
        self.max_model_len = min(capacity, n_ctx_train)
        self.kv = LlamaCppKV(self._mem, capacity, n_seq_max, prefix_cache,
                             defer_release=cpu_fa)
        self.kv.ctx = ctx
        self._max_fill = self.n_batch - (self._pad_lid is not None)  # real tokens per decode

        # numpy views over the batch's C arrays, so a step fills them without per-token ctypes calls
        n = self.n_batch
        self._b_token = np.ctypeslib.as_array(batch.token, shape=(n,))
        self._b_pos = np.ctypeslib.as_array(batch.pos, shape=(n,))
        self._b_logits = np.ctypeslib.as_array(batch.logits, shape=(n,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        self._b_seq = [batch.seq_id[i] for i in range(n)]  # one int32[1] per token

    # ---- the Backend contract -----------------------------------------------------------------
    def forward(self, work: list[SeqWork]) -> list[np.ndarray | None]:
        """One batched step; splits into several llama_decode calls only past n_batch tokens."""
        if self._ctx is None:
            raise RuntimeError("the llama.cpp backend is closed")
        if len({w.seq_id for w in work}) != len(work):
            raise ValueError("a sequence appears twice in one forward step")
        lids = []
        for w in work:
            if not w.token_ids:
                raise ValueError(f"sequence {w.seq_id}: no tokens to feed")
            bad = [t for t in w.token_ids if not 0 <= t < self.n_vocab]
            if bad:
                raise ValueError(f"sequence {w.seq_id}: token id {bad[0]} is out of range "
                                 f"[0, {self.n_vocab})")
            if w.alone and w.start_pos != 0:
                raise ValueError(f"sequence {w.seq_id}: an alone item starts at position 0")
            lids.append(-1 if w.alone else self.kv._prepare_feed(w.seq_id, w.start_pos, len(w.token_ids)))

        outs: list[np.ndarray | None] = [None] * len(work)
        pieces: list[tuple[int, int, int]] = []  # (item, lo, hi): a slice of one item's tokens
        fill = 0
        for i, w in enumerate(work):
            if w.alone:
                outs[i] = self._decode_alone(w)
                continue
            lo = 0
            while lo < len(w.token_ids):
                hi = min(len(w.token_ids), lo + self._max_fill - fill)
                pieces.append((i, lo, hi))
                fill += hi - lo
                lo = hi
                if fill == self._max_fill:
                    self._decode(work, lids, pieces, outs)
                    pieces, fill = [], 0
        if pieces:
            self._decode(work, lids, pieces, outs)
        return outs

    def close(self) -> None:
        """Free the batch, context and model. The tokenizer must not be used afterwards."""
        self._finalizer()
        self._ctx = None

    def __enter__(self) -> "LlamaCppBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def model_meta(self, key: str) -> str | None:
        """A GGUF metadata value as a string, e.g. model_meta("general.name")."""
        return self.tokenizer._meta(key)

    # ---- internals ----------------------------------------------------------------------------
    def _decode_alone(self, w: SeqWork) -> np.ndarray | None:
        """Decode a prompt to score in a context of its own, emptied first: the same ubatches over
        the same cells every time, so its logits never depend on the main context's batch or KV.
        Costs KV memory for one more context, made on the first scoring request."""
        if not self._score:
            ctx = llama_cpp.llama_init_from_model(self._model, self._cparams)
            if not ctx:
                raise ModelLoadError("llama.cpp could not create the context for scoring prompts")
            self._score.append((llama_cpp.llama_batch_init(self.n_batch, 0, 1), ctx))
        batch, ctx = self._score[0]
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        n_tok = len(w.token_ids)
        out = np.empty((n_tok, self.n_vocab), dtype=np.float32) if w.all_logits else None
        for lo in range(0, n_tok, self.n_batch):
            hi = min(n_tok, lo + self.n_batch)
            for j, t in enumerate(range(lo, hi)):
                batch.token[j], batch.pos[j], batch.n_seq_id[j] = w.token_ids[t], t, 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = w.all_logits or (w.need_logits and t == n_tok - 1)
            batch.n_tokens = hi - lo
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise LlamaDecodeError(_DECODE_ERRORS.get(rc, _DECODE_ERRORS[-2]).format(rc=rc, n=hi - lo), rc)
            if w.all_logits:
                out[lo:hi] = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(hi - lo, self.n_vocab))
            elif w.need_logits and hi == n_tok:
                out = np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(1, self.n_vocab))[0].copy()
        return out

    def _decode(self, work: list[SeqWork], lids: list[int], pieces: list[tuple[int, int, int]],
                outs: list[np.ndarray | None]) -> None:
        rows: list[tuple[int, int, int, int]] = []  # (item, first output row, first token, count)
        n = n_out = 0
        for i, lo, hi in pieces:
            w, m = work[i], hi - lo
            self._b_token[n:n + m] = w.token_ids[lo:hi]
            self._b_pos[n:n + m] = np.arange(w.start_pos + lo, w.start_pos + hi)
            self._b_logits[n:n + m] = 0
            for ptr in self._b_seq[n:n + m]:
                ptr[0] = lids[i]
            if w.need_logits and w.all_logits:
                self._b_logits[n:n + m] = 1
                rows.append((i, n_out, lo, m))
                n_out += m
            elif w.need_logits and hi == len(w.token_ids):
                self._b_logits[n + m - 1] = 1
                rows.append((i, n_out, hi - 1, 1))
                n_out += 1
            n += m
        pad = self._pad_lid is not None and n % self.n_ubatch == 1
        if pad:  # the last ubatch would hold a lone token: add a throwaway one
            self._b_token[n], self._b_pos[n], self._b_logits[n] = 0, 0, 0
            self._b_seq[n][0] = self._pad_lid
            n += 1
        self._batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if pad:
            llama_cpp.llama_memory_seq_rm(self._mem, self._pad_lid, -1, -1)
        if rc != 0:
            msg = _DECODE_ERRORS.get(rc, _DECODE_ERRORS[-2])
            raise LlamaDecodeError(msg.format(rc=rc, n=n), rc)
        for i, lo, hi in pieces:
            self.kv._written(work[i].seq_id, work[i].token_ids[lo:hi])
        if not n_out:
            return
        # Output rows are contiguous, in batch order; copy them out of llama.cpp's buffer.
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx),
                                       shape=(n_out, self.n_vocab))  # (n_out, V), a view
        for i, r0, k0, m in rows:
            w = work[i]
            if w.all_logits:
                if outs[i] is None:
                    outs[i] = np.empty((len(w.token_ids), self.n_vocab), dtype=np.float32)
                outs[i][k0:k0 + m] = logits[r0:r0 + m]  # (m, V)
            else:
                outs[i] = logits[r0].copy()  # (V,)


_DECODE_ERRORS = {
    1: "llama_decode found no free KV cells for {n} tokens (rc={rc}); the KV accounting and "
       "llama.cpp disagree, or n_ctx is too small",
    2: "llama_decode was aborted (rc={rc})",
    -1: "llama_decode rejected the batch of {n} tokens as invalid (rc={rc}): see the "
        "hearth.llamacpp log (positions must continue each sequence's KV)",
    -2: "llama_decode failed with rc={rc} ({n} tokens); tokens decoded before the failure may "
        "remain in the KV cache",
}
