"""The tokenizer half of HF → GGUF: a byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary.

    vocab = read_bpe_vocab(ckpt_dir, vocab_size=config["vocab_size"])
    vocab.add_to(writer)          # tokens, token types, merges, special ids, add_bos, pre, chat template

llama.cpp does not run the HF pre-tokenizer: it picks a built-in regex by the name in
`tokenizer.ggml.pre`. The name is found here from the structure of tokenizer.json's pre_tokenizer
(never from the model's name), and a structure with no llama.cpp equivalent is an error rather than a
silently different tokenization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from hearth.runtime.errors import ModelLoadError, UnsupportedModelError

from .common import say

# Split regexes of the HF tokenizers that llama.cpp reimplements (tokenizer.json, "Split" pre-tokenizer).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Normalized pre-tokenizer structure -> llama.cpp's `tokenizer.ggml.pre` name.
PRE_TOKENIZERS: dict[tuple[tuple[str, ...], ...], str] = {
    (("bytelevel-regex",),): "gpt-2",  # GPT-2's regex inside ByteLevel (also the tiny test tokenizers)
    (("digits",), ("bytelevel-regex",)): "smollm",  # SmolLM/SmolLM2: single digits, then GPT-2's regex
    (("split", QWEN2_REGEX), ("bytelevel",)): "qwen2",
    (("split", LLAMA3_REGEX), ("bytelevel",)): "llama-bpe",
}
_PRE_NAMES = {
    "gpt-2": "ByteLevel (GPT-2 regex)", "smollm": "Digits(individual) + ByteLevel (SmolLM)",
    "qwen2": "Split(Qwen2 regex) + ByteLevel", "llama-bpe": "Split(Llama 3 regex) + ByteLevel",
}
# Normalizers llama.cpp has no equivalent of but that leave typical text unchanged (Qwen2 uses NFC).
_HARMLESS_NORMALIZERS = ("NFC",)


@dataclass
class BPEVocab:
    """Everything llama.cpp needs to tokenize like the HF tokenizer."""

    tokens: list[str]
    token_types: list[int]
    """gguf.TokenType per id: NORMAL, CONTROL (special added), USER_DEFINED (other added), UNUSED (padding)."""
    merges: list[str]
    """"left right" pairs in rank order."""
    pre: str
    special_ids: dict[str, int] = field(default_factory=dict)
    """"bos" / "eos" / "unk" / "pad" -> id, for the ones the tokenizer has."""
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        writer.add_token_merges(self.merges)
        setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                   "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for kind, token_id in self.special_ids.items():
            setters[kind](token_id)
        # Written explicitly: llama.cpp's default add_bos depends on the pre-tokenizer name.
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _pre_parts(pt: dict[str, Any] | None) -> list[tuple[str, ...]]:
    """Flatten a tokenizer.json pre_tokenizer into comparable parts; unknown pieces keep their JSON."""
    if pt is None:
        return [("none",)]
    kind = pt.get("type")
    if kind == "Sequence":
        return [p for sub in pt.get("pretokenizers", []) for p in _pre_parts(sub)]
    if kind == "ByteLevel":
        if pt.get("add_prefix_space"):
            # HF would prepend a space to every text; llama.cpp's BPE never does.
            return [("bytelevel-add-prefix-space",)]
        return [("bytelevel-regex",) if pt.get("use_regex", True) else ("bytelevel",)]
    if kind == "Digits" and pt.get("individual_digits"):
        return [("digits",)]
    if kind == "Split" and pt.get("behavior") == "Isolated" and not pt.get("invert"):
        pattern = pt.get("pattern", {})
        if "Regex" in pattern:
            return [("split", pattern["Regex"])]
    return [("other", json.dumps(pt, sort_keys=True))]


def detect_pre_tokenizer(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json; UnsupportedModelError if it has none."""
    parts = tuple(_pre_parts(tokenizer_json.get("pre_tokenizer")))
    pre = PRE_TOKENIZERS.get(parts)
    if pre is None:
        shown = json.dumps(tokenizer_json.get("pre_tokenizer"))[:300]
        known = "; ".join(f"{desc} -> {name}" for name, desc in _PRE_NAMES.items())
        raise UnsupportedModelError(f"the tokenizer's pre-tokenizer {shown} has no llama.cpp equivalent; "
                                    f"supported: {known}")
    return pre


def _merge_strings(merges: list[Any]) -> list[str]:
    # tokenizers >= 0.20 saves merges as [left, right] pairs; older files as "left right" strings.
    out = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, (list, tuple)) and len(m) == 2:
            if " " in m[0] or " " in m[1]:
                raise UnsupportedModelError(f"BPE merge {m!r} contains a space, which GGUF's "
                                            f"'left right' merge format cannot express")
            out.append(f"{m[0]} {m[1]}")
        else:
            raise ModelLoadError(f"unreadable BPE merge entry {m!r} in tokenizer.json")
    return out


def _adds_special(tok: Any, token_id: int | None, at_start: bool) -> bool:
    # What HF's own encode does is the ground truth (post-processor, add_bos_token flags, legacy configs).
    if token_id is None:
        return False
    plain = tok.encode("Hello", add_special_tokens=False)
    full = tok.encode("Hello", add_special_tokens=True)
    if len(full) <= len(plain):
        return False
    return (full[0] == token_id) if at_start else (full[-1] == token_id)


def read_bpe_vocab(ckpt: str | Path, vocab_size: int) -> BPEVocab:
    """Read the HF tokenizer of a checkpoint dir as a GGUF "gpt2" vocabulary of `vocab_size` entries
    (the embedding's row count; ids the tokenizer does not use become UNUSED padding tokens)."""
    from transformers import AutoTokenizer

    ckpt = Path(ckpt)
    try:
        tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {ckpt}: {e}") from e
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(f"the tokenizer of {ckpt} ({type(tok).__name__}) has no tokenizer.json "
                                    f"(fast tokenizer); only byte-level BPE tokenizers can be converted")
    tj = json.loads(backend.to_str())
    model = tj.get("model", {})
    parts = _pre_parts(tj.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not any(p[0].startswith("bytelevel") for p in parts):
        raise UnsupportedModelError(
            f"the tokenizer of {ckpt} is {model.get('type')} with pre-tokenizer "
            f"{(tj.get('pre_tokenizer') or {}).get('type')}; only byte-level BPE tokenizers (GPT-2 style: "
            f"SmolLM, Qwen2, Llama 3) can be converted, not SentencePiece-style ones")
    pre = detect_pre_tokenizer(tj)
    norm = tj.get("normalizer")
    if norm is not None and norm.get("type") not in _HARMLESS_NORMALIZERS:
        say(f"warning: llama.cpp ignores the tokenizer's {norm.get('type')} normalizer")

    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise ModelLoadError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is "
                             f"{vocab_size}; tokenizer and weights do not belong together")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    special: dict[str, int] = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            special[kind] = token_id
    template = tok.chat_template if isinstance(getattr(tok, "chat_template", None), str) else None
    return BPEVocab(tokens=tokens, token_types=[int(t) for t in types], merges=_merge_strings(model.get("merges", [])),
                    pre=pre, special_ids=special,
                    add_bos=_adds_special(tok, special.get("bos"), at_start=True),
                    add_eos=_adds_special(tok, special.get("eos"), at_start=False),
                    chat_template=template)
