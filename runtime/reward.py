"""A reward model: one number per conversation, higher is better (the `rm` stage's checkpoints).

    scorer = RewardScorer.load("runs/rm")
    scorer.score_chats([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])

The checkpoint is an HF AutoModelForSequenceClassification with one label (safetensors only). A
conversation is rendered with the checkpoint's chat template through hearth's sandboxed renderer (a
template is outside input) and cut to `max_length` tokens from the left, so the answer being judged is
always kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .chat_template import render_chat_template
from .errors import ModelLoadError


class RewardScorer:
    """A loaded reward model and its tokenizer."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu", max_length: int | None = None):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_length = min(x for x in (max_length, limit) if x) if (max_length or limit) else None

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", max_length: int | None = None) -> "RewardScorer":
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path.name}: not a reward model checkpoint (no config.json)")
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                                   dtype=torch.float32)
        if model.config.num_labels != 1:
            raise ModelLoadError(f"{path.name}: a reward model has one output; this one has {model.config.num_labels}")
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return cls(model.to(device).eval(), tok, device, max_length)

    def score(self, texts: Sequence[str], batch_size: int = 8) -> list[float]:
        """Rewards of already-rendered texts (`score_chats` renders conversations first)."""
        import torch

        out: list[float] = []
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "left"  # keep the end: the answer being judged
        try:
            for i in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", padding=True,
                                     padding_side="right", add_special_tokens=False,
                                     truncation=self.max_length is not None, max_length=self.max_length)
                with torch.inference_mode():
                    out += self.model(**enc.to(self.device)).logits[:, 0].float().tolist()  # (B,)
        finally:
            self.tokenizer.truncation_side = side
        return out

    def render(self, conversation: list[dict[str, Any]]) -> str:
        tok = self.tokenizer
        template = tok.chat_template
        if not template:
            raise ModelLoadError("the reward model has no chat template to render a conversation with")
        return render_chat_template(template, conversation, add_generation_prompt=False,
                                    bos_token=tok.bos_token or "", eos_token=tok.eos_token or "")

    def score_chats(self, conversations: Sequence[list[dict[str, Any]]], batch_size: int = 8) -> list[float]:
        """Rewards of whole conversations (the prompt messages followed by the assistant's answer)."""
        return self.score([self.render(c) for c in conversations], batch_size)
