"""The shared training plumbing: typed recipes, atomic checkpoints, resume-safe metrics, publishing.

    python -m pytest tests/training/test_common.py -q
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from hearth.runtime.checkpoint import read_manifest
from hearth.training.common import (MetricsLog, RunDir, TrainingConfigError, TrainingDataError, load_config,
                                    parse_overrides, plot_metrics, publish, stage_manifest)


@dataclass
class Demo:
    model: str
    lr: float = 1e-4
    steps: int = 10
    method: Literal["full", "lora"] = "lora"
    data: list[str] = field(default_factory=list)
    note: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps must be >= 1")


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_a_recipe_becomes_a_typed_config(tmp_path):
    cfg = load_config(Demo, _recipe(tmp_path, "model: m\nlr: 3e-4\nmethod: full\ndata: [a.jsonl, b.jsonl]\n"),
                      overrides=parse_overrides(["steps=5", "note=hi"]))
    assert cfg == Demo(model="m", lr=3e-4, steps=5, method="full", data=["a.jsonl", "b.jsonl"], note="hi")


@pytest.mark.parametrize("text, words", [
    ("model: m\nlerning_rate: 1\n", ["lerning_rate", "unknown"]),
    ("model: m\nsteps: many\n", ["steps", "integer"]),
    ("model: m\nmethod: qlora\n", ["method", "'full'"]),
    ("model: m\nsteps: 0\n", ["steps must be >= 1"]),
    ("lr: 1\n", ["model"]),
    ("model: m\ndata: a.jsonl\n", ["data", "list"]),
])
def test_a_bad_recipe_names_the_file_and_field(tmp_path, text, words):
    path = _recipe(tmp_path, text)
    with pytest.raises(TrainingConfigError) as e:
        load_config(Demo, path)
    for w in words:
        assert w in str(e.value)
    assert str(path) in str(e.value)


def test_data_error_names_file_line_and_field():
    e = TrainingDataError("x.jsonl", 7, "output", "is empty")
    assert str(e) == "x.jsonl:7: field 'output': is empty" and e.line == 7


def test_checkpoints_are_whole_or_absent_and_pruned(tmp_path):
    run = RunDir(tmp_path / "run", keep=2)
    assert run.latest() is None
    for step in (10, 20, 30):
        run.save_checkpoint(step, lambda d, s=step: (d / "w.txt").write_text(str(s)), {"epoch": 0})
    assert [c.step for c in run.list()] == [20, 30]
    latest = run.latest()
    assert latest.step == 30 and latest.state == {"epoch": 0, "step": 30}
    assert (latest.path / "w.txt").read_text() == "30"

    def crash(d: Path) -> None:
        (d / "w.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(40, crash, {})
    assert run.latest().step == 30
    assert not [p for p in run.checkpoints.iterdir() if p.name.startswith(".")]


def test_metrics_resume_drops_what_the_killed_run_wrote_after_its_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for s in range(1, 8):
        log.log(step=s, loss=1.0 / s)
    with open(path, "a") as f:
        f.write('{"step": 8, "lo')  # cut by a kill
    log = MetricsLog(path, resume_step=5)
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5]
    log.log(step=6, loss=0.1)
    assert [r["step"] for r in log.read()] == [1, 2, 3, 4, 5, 6]
    png = plot_metrics(path, tmp_path / "loss.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics(path, tmp_path / "x.png", keys=("reward",)) is None


def test_publish_writes_the_model_with_its_manifest_and_keeps_the_run_files(tmp_path, tiny_llama):
    out = tmp_path / "out"
    run = RunDir(out)
    MetricsLog(run.metrics).log(step=1, loss=2.0)
    (out / "stale-shard.safetensors").write_text("old")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    manifest = stage_manifest("sft", "sft-lora", tiny_llama, {"lr": 1e-4, "path": Path("/x")}, [data])
    publish(out, lambda d: (d / "model.safetensors").write_bytes((tiny_llama / "model.safetensors").read_bytes())
            or (d / "config.json").write_text((tiny_llama / "config.json").read_text()), manifest)
    assert not (out / "stale-shard.safetensors").exists()
    assert (out / "metrics.jsonl").exists() and (out / "model.safetensors").exists()
    m = read_manifest(out)
    assert m.stage == "sft" and m.parent.path == str(tiny_llama.resolve()) and "d.jsonl" in m.data_hashes
    assert json.loads((out / "hearth.json").read_text())["parameters"]["path"] == "/x"
