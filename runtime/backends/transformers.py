"""The transformers backend: HF weights (fp32/bf16/fp16, bitsandbytes int8/nf4, GPTQ) run by our own
batched step over a paged KV cache.

We keep HF's modules (embeddings, norms, q/k/v/o projections, MLPs, rotary embedding, lm_head) so
every quantized Linear works unchanged, and own only the attention read/write against the paged
cache. That is what lets many sequences of different lengths, prefill chunks and decode steps alike,
share one forward pass. LLaMA-family decoders only; others fail with the supported list.

GPTQ needs no flag: a checkpoint whose config.json carries a GPTQ quantization_config loads through
transformers' GPTQ integration (optimum + gptqmodel kernels; on CPU, any dtype: the kernel runs in bf16).
"""

from __future__ import annotations

import functools

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..chat_template import DEFAULT_CHATML_TEMPLATE, render_chat_template
from ..checkpoint import check_trust_remote_code, inspect_checkpoint
from ..errors import ModelLoadError, UnsupportedModelError
from ..kv_cache import BlockManager
from .base import SeqWork

# model_type -> whether attention applies per-head q/k RMSNorm before RoPE
SUPPORTED_ARCHITECTURES = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}


class HFTokenizer:
    """The Tokenizer contract over a transformers tokenizer; chat templates render in our sandbox."""

    def __init__(self, tok, generation_config=None, chat_template: str | None = None):
        self._tok = tok
        self.vocab_size = len(tok)
        self.bos_token = tok.bos_token or ""
        self.eos_token = tok.eos_token or ""
        self.chat_template = chat_template or getattr(tok, "chat_template", None)
        eos: set[int] = set()
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        gen_eos = getattr(generation_config, "eos_token_id", None) if generation_config else None
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(int(t) for t in gen_eos)
        self.eos_token_ids = frozenset(eos)
        self._special_ids = frozenset(int(t) for t in tok.all_special_ids) | frozenset(
            int(i) for i, t in getattr(tok, "added_tokens_decoder", {}).items() if t.special)
        self._byte_mode: str | None = None  # found on first token_bytes (serializes the tokenizer)
        self._pieces: dict[int, bytes] = {}

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens,
                                     split_special_tokens=not parse_special))

    @functools.cached_property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of every special token (the ones split_special_tokens=True keeps as text)."""
        out = {t: int(i) for t, i in zip(self._tok.all_special_tokens, self._tok.all_special_ids)}
        for i, t in getattr(self._tok, "added_tokens_decoder", {}).items():
            if t.special:
                out[t.content] = int(i)
        return {t: i for t, i in out.items() if t}

    def wrap_special(self, ids: list[int]) -> list[int]:
        """ids with what encode(add_special_tokens=True) puts around a text (BOS for LLaMA ...)."""
        head, tail = self._around
        return head + list(ids) + tail

    @functools.cached_property
    def _around(self) -> tuple[list[int], list[int]]:
        bare = list(self._tok.encode("a", add_special_tokens=False))
        full = list(self._tok.encode("a", add_special_tokens=True))
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return full[:i], full[i + len(bare):]
        return [], []

    def decode(self, ids: Sequence[int]) -> str:
        # no space clean-up: streamed text must never be rewritten once later tokens arrive
        return self._tok.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> str:
        return render_chat_template(self.chat_template or DEFAULT_CHATML_TEMPLATE, messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token as decode joins them; b"" for special tokens (decode skips them)
        and for padding ids past the tokenizer. Byte-level BPE pieces map back through GPT-2's byte
        table, so a character split over tokens comes back as its partial UTF-8 bytes. SentencePiece
        pieces keep the leading space that decode strips from the very first token."""
        piece = self._pieces.get(token)
        if piece is None:
            if token < 0:
                raise ValueError(f"token id {token} is negative")
            piece = self._piece(token)
            self._pieces[token] = piece
        return piece

    def _piece(self, token: int) -> bytes:
        if token in self._special_ids or token >= len(self._tok):
            return b""
        text = self._tok.convert_ids_to_tokens(token)
        if text is None:
            return b""
        if self._byte_mode is None:
            self._byte_mode = _byte_mode(self._tok)
        if self._byte_mode == "byte_level":
            # as the tokenizers ByteLevel decoder: a piece with a char outside the table (an added
            # token such as "<think>" stored as plain text) is taken as its UTF-8
            try:
                return bytes(_GPT2_BYTE_DECODER[c] for c in text)
            except KeyError:
                return text.encode("utf-8")
        if self._byte_mode == "metaspace":
            if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):  # byte fallback
                return bytes([int(text[3:5], 16)])
            return text.replace("\u2581", " ").encode("utf-8")
        return self.decode([token]).encode("utf-8")  # other decoders (WordPiece ...): best effort


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in char for each byte, inverted (byte-level BPE vocabularies use it)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


_GPT2_BYTE_DECODER = _gpt2_byte_decoder()


def _byte_mode(tok) -> str:
    """How a token's piece becomes bytes: "byte_level" (GPT-2 style BPE), "metaspace" (SentencePiece
    with byte fallback), or "decode" (anything else: decode the token alone)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return "byte_level" if hasattr(tok, "byte_decoder") else "decode"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"Metaspace", "Replace", "ByteFallback"}:
        return "metaspace"
    return "decode"


def _torch_dtype(dtype: str, device: torch.device):
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else (
            torch.float16 if device.type == "cuda" else torch.float32)
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of auto, {', '.join(table)}; got {dtype!r}")
    return table[dtype]


class TransformersBackend:
    """Backend contract (runtime.backends.base) over a transformers causal LM."""

    name = "transformers"

    def __init__(self, model_path: str | os.PathLike, *, dtype: str = "auto", device: str = "auto",
                 quantization: str | None = None, device_map: str | dict | None = None,
                 max_model_len: int | None = None, kv_cache_gb: float | None = None,
                 block_size: int = 16, prefix_cache: bool = True, allow_pickle: bool = False,
                 trust_remote_code: bool = False, num_threads: int | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        if num_threads:
            torch.set_num_threads(num_threads)
        info = inspect_checkpoint(model_path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        path = Path(model_path)
        kwargs: dict = {"local_files_only": True}  # never reach for a model hub
        if info.format == "gguf":  # dequantized into torch weights by transformers
            load_dir, kwargs["gguf_file"] = str(info.model_file.parent), info.model_file.name
        else:
            load_dir = str(path)
            cfg = json.loads((path / "config.json").read_text())
            check_trust_remote_code(cfg, trust_remote_code)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device if device != "cuda" else "cuda:0")
        config = AutoConfig.from_pretrained(load_dir, trust_remote_code=trust_remote_code, **kwargs)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {model_type!r} is not supported by the transformers backend; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}")
        torch_dtype = _torch_dtype(dtype, self.device)
        if quantization in ("int8", "nf4"):
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = (
                BitsAndBytesConfig(load_in_8bit=True) if quantization == "int8" else
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch_dtype))
        elif quantization is not None:
            raise ValueError(f"quantization must be None, 'int8' or 'nf4'; got {quantization!r}")
        if device_map is not None:
            kwargs["device_map"] = device_map
        try:
            safetensors_only = info.format == "hf-safetensors" and not allow_pickle
            model = AutoModelForCausalLM.from_pretrained(
                load_dir, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                use_safetensors=True if safetensors_only else None, **kwargs)
            tok = AutoTokenizer.from_pretrained(load_dir, trust_remote_code=trust_remote_code, local_files_only=True,
                                                **({"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}))
        except (OSError, ValueError, ImportError) as e:  # ImportError: a quantization library is missing
            raise ModelLoadError(f"cannot load model from {model_path}: {e}") from e
        if device_map is None and "quantization_config" not in kwargs and not getattr(model, "hf_device_map", None):
            model.to(self.device)
        model.eval()
        self.model = model
        self.config = config
        try:
            gen_cfg = GenerationConfig.from_pretrained(load_dir, local_files_only=True) if "gguf_file" not in kwargs \
                else model.generation_config
        except OSError:
            gen_cfg = model.generation_config
        self.tokenizer = HFTokenizer(tok, gen_cfg)

        base = model.model
        self._layers = list(base.layers)
        self._qk_norm = SUPPORTED_ARCHITECTURES[model_type]
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        limit = config.max_position_embeddings
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            limit = min(limit, config.sliding_window)  # no sliding-window attention here: stay inside it
        self.max_model_len = min(max_model_len or limit, limit)

        # KV cache: one flat slot tensor per layer, on that layer's device (device_map splits layers)
        self._layer_devices = [next(layer.parameters()).device for layer in self._layers]
        kv_dtype = torch_dtype if torch_dtype != torch.float32 or self.device.type == "cpu" else torch.float32
        if quantization or getattr(config, "quantization_config", None):
            kv_dtype = torch_dtype
            _quiet_bnb_cast_warning()
        per_token = 2 * len(self._layers) * self.n_kv_heads * self.head_dim * torch.tensor([], dtype=kv_dtype).element_size()
        budget = int((kv_cache_gb if kv_cache_gb is not None else self._default_kv_gb()) * 2**30)
        num_blocks = max(1, budget // (per_token * block_size))
        self.kv = BlockManager(num_blocks, block_size, prefix_cache=prefix_cache)
        slots = num_blocks * block_size
        self._k = [torch.zeros(slots, self.n_kv_heads, self.head_dim, dtype=kv_dtype, device=d)
                   for d in self._layer_devices]
        self._v = [torch.zeros_like(k) for k in self._k]
        self.kv_bytes = per_token * slots

    def _default_kv_gb(self) -> float:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return max(0.5, 0.8 * free / 2**30 - 1.0)
        import psutil
        return min(4.0, 0.25 * psutil.virtual_memory().available / 2**30)

    # ---- the forward step --------------------------------------------------------------------
    def _slots(self, seq_id: int, start: int, end: int) -> np.ndarray:
        bs = self.kv.block_size
        table = np.asarray(self.kv.block_table(seq_id), dtype=np.int64)
        pos = np.arange(start, end)
        return table[pos // bs] * bs + pos % bs

    def forward(self, work: list[SeqWork]) -> list[np.ndarray | None]:
        # an `alone` item (a prompt to score) gets a pass of its own: matmuls over its rows only
        out: list[np.ndarray | None] = [None] * len(work)
        shared = [i for i, w in enumerate(work) if not w.alone]
        groups = [[i] for i, w in enumerate(work) if w.alone] + ([shared] if shared else [])
        for idx in groups:
            for i, lg in zip(idx, self._forward([work[i] for i in idx])):
                out[i] = lg
        return out

    @torch.inference_mode()
    def _forward(self, work: list[SeqWork]) -> list[np.ndarray | None]:
        dev0 = self.model.model.embed_tokens.weight.device
        lens = [len(w.token_ids) for w in work]
        offsets = np.cumsum([0] + lens)
        T = int(offsets[-1])
        ids = torch.tensor([t for w in work for t in w.token_ids], dtype=torch.long, device=dev0)
        pos_np = np.concatenate([np.arange(w.start_pos, w.start_pos + n) for w, n in zip(work, lens)])
        slot_np = np.concatenate([self._slots(w.seq_id, w.start_pos, w.start_pos + n) for w, n in zip(work, lens)])
        positions = torch.from_numpy(pos_np).to(dev0)

        # decode steps (one token each) share one padded attention call; prefill chunks go one by one
        dec = [i for i, n in enumerate(lens) if n == 1]
        pre = [i for i, n in enumerate(lens) if n > 1]
        dec_rows = torch.tensor(offsets[dec], dtype=torch.long) if dec else None
        dec_gather = dec_mask = None
        if dec:
            ctx = [work[i].start_pos + 1 for i in dec]
            lmax = max(ctx)
            gather = np.zeros((len(dec), lmax), dtype=np.int64)
            mask = np.zeros((len(dec), 1, 1, lmax), dtype=bool)
            for r, i in enumerate(dec):
                gather[r, :ctx[r]] = self._slots(work[i].seq_id, 0, ctx[r])
                mask[r, 0, 0, :ctx[r]] = True
            dec_gather, dec_mask = torch.from_numpy(gather), torch.from_numpy(mask)
        pre_ctx = {}
        for i in pre:
            w = work[i]
            if w.start_pos > 0:  # attends to cached KV: explicit causal mask with an offset
                ctx = w.start_pos + lens[i]
                q_pos = torch.arange(w.start_pos, ctx).unsqueeze(1)
                pre_ctx[i] = (torch.from_numpy(self._slots(w.seq_id, 0, ctx)),
                              (torch.arange(ctx).unsqueeze(0) <= q_pos)[None, None])

        hidden = self.model.model.embed_tokens(ids)  # (T, hidden)
        cos, sin = self.model.model.rotary_emb(hidden[None], positions[None])  # (1, T, D)
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # (T, 1, D)
        slots = torch.from_numpy(slot_np)
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        for li, layer in enumerate(self._layers):
            d = self._layer_devices[li]
            if hidden.device != d:
                hidden, cos, sin = hidden.to(d), cos.to(d), sin.to(d)
            attn = layer.self_attn
            h = layer.input_layernorm(hidden)
            q = attn.q_proj(h).view(T, H, D)
            k = attn.k_proj(h).view(T, Hkv, D)
            v = attn.v_proj(h).view(T, Hkv, D)
            if self._qk_norm:
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kc, vc = self._k[li], self._v[li]
            s = slots.to(d)
            kc.index_copy_(0, s, k.to(kc.dtype))
            vc.index_copy_(0, s, v.to(vc.dtype))
            scale = getattr(attn, "scaling", D ** -0.5)
            out = torch.empty(T, H, D, dtype=q.dtype, device=d)
            if dec:
                rows = dec_rows.to(d)
                qd = q.index_select(0, rows).unsqueeze(2)  # (B, H, 1, D)
                g = dec_gather.to(d)
                shape = (*g.shape, Hkv, D)
                kd = kc.index_select(0, g.view(-1)).view(shape).transpose(1, 2).to(q.dtype)  # (B, Hkv, L, D)
                vd = vc.index_select(0, g.view(-1)).view(shape).transpose(1, 2).to(q.dtype)
                o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dec_mask.to(d), scale=scale,
                                                   enable_gqa=H != Hkv)
                out.index_copy_(0, rows, o.squeeze(2))
            for i in pre:
                a, b = int(offsets[i]), int(offsets[i + 1])
                qp = q[a:b].transpose(0, 1)[None]  # (1, H, n, D)
                if i in pre_ctx:
                    g, m = pre_ctx[i]
                    kp = kc.index_select(0, g.to(d)).transpose(0, 1)[None].to(q.dtype)
                    vp = vc.index_select(0, g.to(d)).transpose(0, 1)[None].to(q.dtype)
                    o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m.to(d), scale=scale,
                                                       enable_gqa=H != Hkv)
                else:
                    o = F.scaled_dot_product_attention(qp, k[a:b].transpose(0, 1)[None],
                                                       v[a:b].transpose(0, 1)[None], is_causal=True,
                                                       scale=scale, enable_gqa=H != Hkv)
                out[a:b] = o[0].transpose(0, 1)
            hidden = hidden + attn.o_proj(out.view(T, H * D))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

        for w in work:
            self.kv.note_written(w.seq_id, w.start_pos, w.token_ids)
        rows, spans = [], []
        for i, w in enumerate(work):
            a, b = int(offsets[i]), int(offsets[i + 1])
            if not w.need_logits:
                spans.append(None)
            elif w.all_logits:
                spans.append((len(rows), len(rows) + b - a))
                rows.extend(range(a, b))
            else:
                spans.append((len(rows), len(rows) + 1))
                rows.append(b - 1)
        if not rows:
            return [None] * len(work)
        lm_dev = self.model.lm_head.weight.device
        hsel = self.model.model.norm(hidden.to(lm_dev)[torch.tensor(rows, device=lm_dev)])
        logits = self.model.lm_head(hsel).float().cpu().numpy()  # (R, V)
        result: list[np.ndarray | None] = []
        for w, span in zip(work, spans):
            if span is None:
                result.append(None)
            elif w.all_logits:
                result.append(logits[span[0]:span[1]])
            else:
                result.append(logits[span[0]])
        return result

    def close(self) -> None:
        self._k.clear()
        self._v.clear()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Once(logging.Filter):
    """Let a message through the first time only."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_bnb_cast_warning() -> None:
    # bitsandbytes logs "inputs will be cast ... to float16" on every int8 matmul of a float32 model:
    # thousands of lines per generated answer
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once("MatMul8bitLt: inputs will be cast"))
