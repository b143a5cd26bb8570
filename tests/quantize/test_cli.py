"""The `quantize` command and its recipes, as a user runs them: exit codes, outputs, reports, reruns.

    python -m pytest tests/quantize/test_cli.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.quantize.cli import main
from hearth.quantize.common import QuantizeError
from hearth.quantize.recipe import load_recipe

from tests.conftest import build_tiny_model
from tests.offline_child import NO_NETWORK, REPORT_NETWORK


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("q-cli") / "tiny", hidden_size=64, intermediate_size=128)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- recipe checks


@pytest.mark.parametrize("body, words", [
    ("source: x\noutput_dir: o\nartifacts: []\n", ["at least one artifact"]),
    ("source: x\noutput_dir: o\nartifacts:\n  - {name: a, method: awq}\n", ["artifacts[0]", "awq", "gptq"]),
    ("source: x\noutput_dir: o\nartifacts:\n  - {name: a, method: gptq, bitz: 4}\n", ["bitz", "bits"]),
    ("source: x\noutput_dir: o\nartifacts:\n  - {name: a, method: gguf, type: q8_0}\n", ["*.gguf"]),
    ("source: x\noutput_dir: o\nartifacts:\n  - {name: a, method: merge}\n", ["adapter"]),
    ("source: x\noutput_dir: o\nartifacts:\n  - {name: a, method: bnb}\n  - {name: a, method: bnb}\n",
     ["unique", "'a'"]),
    ("source: x\nartifacts:\n  - {name: a, method: bnb}\n", ["output_dir"]),
    ("source: x\noutput_dir: o\nartifact: []\n", ["artifact", "unknown"]),
    ("source: [x\n", ["YAML"]),
])
def test_a_bad_recipe_names_what_is_wrong(tmp_path, body, words):
    f = _write(tmp_path / "r.yaml", body)
    with pytest.raises(QuantizeError) as e:
        load_recipe(f)
    for w in words:
        assert w in str(e.value)
    assert str(f) in str(e.value)


def test_the_bundled_recipe_loads():
    r = load_recipe(Path(__file__).resolve().parents[2] / "quantize" / "recipes" / "smollm2.yaml")
    assert {a.method for a in r.artifacts} == {"bnb", "gptq", "gguf"}
    gptq4 = next(a for a in r.artifacts if a.name == "gptq-int4")
    assert gptq4.options["bits"] == 4 and gptq4.options["group_size"] == 64 and gptq4.max_ppl_increase == 10


# ----------------------------------------------------------------------------- the command


def test_missing_checkpoint_is_a_clear_error_not_a_traceback(tmp_path):
    missing = tmp_path / "nope"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "hearth.quantize.cli", "gguf", str(missing), "--type", "f16",
                        "-o", str(tmp_path / "o.gguf")], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and str(missing) in p.stderr and "error" in p.stderr
    assert not (tmp_path / "o.gguf").exists()


def test_unknown_gguf_type_is_refused(tiny, tmp_path, capsys):
    assert main(["gguf", str(tiny), "--type", "q3_xs", "-o", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert "q3_xs" in err and "q4_k_m" in err


def test_gguf_help_lists_every_type_its_error_lists(tiny, tmp_path, capsys):
    from hearth.quantize.gguf import GGUF_TYPES
    with pytest.raises(SystemExit):
        main(["gguf", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert main(["gguf", str(tiny), "--type", "q3_xs", "-o", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    for t in GGUF_TYPES:
        assert t in help_text and t in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("quantize (hearth) ")


# A child process that records every attempt to open a network connection (and refuses it), then runs
# `quantize` as a user would: HF_HUB_OFFLINE unset, bitsandbytes imported (it probes a kernel hub on import).
_NO_NETWORK = NO_NETWORK + """
from hearth.quantize.cli import main
rc = main(sys.argv[1:])
""" + REPORT_NETWORK + "sys.exit(rc)\n"


def _quantize_child(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY")}
    env["HEARTH_HOME"] = str(tmp_path / "home")
    return subprocess.run([sys.executable, "-c", _NO_NETWORK, *args], env=env, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)


def test_bnb_reaches_no_network_and_prints_no_library_noise(tiny, tmp_path):
    p = _quantize_child(["bnb", str(tiny), "--int8", "-o", str(tmp_path / "int8")], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "NETWORK: []" in p.stderr
    for noise in ("kernels-community", "trust_remote_code", "Enum subclass", "Setting accelerator",
                  "Warning", "WARNING", "deprecated"):
        assert noise not in p.stderr, p.stderr[-3000:]


def test_verbose_brings_the_library_warnings_back(tmp_path):
    # logged the way bitsandbytes and DeepSpeed log (DeepSpeed resets its level on import)
    code = ("import logging, sys\n"
            "from hearth.runtime.quiet import setup_output, pop_verbose\n"
            "argv, verbose = pop_verbose(sys.argv[1:])\n"
            "setup_output(verbose)\n"
            "logging.getLogger('DeepSpeed').setLevel(logging.WARNING)\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('Failed to load CPU gemm_4bit_forward')\n"
            "logging.getLogger('DeepSpeed').warning('Setting accelerator to CPU')\n"
            "logging.getLogger('hearth.x').warning('hearth says this')\n"
            "import warnings; warnings.warn('old api', FutureWarning)\n")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    loud = subprocess.run([sys.executable, "-c", code, "--verbose"], capture_output=True, text=True, timeout=60)
    assert "hearth says this" in quiet.stderr
    assert "gemm_4bit" not in quiet.stderr and "accelerator" not in quiet.stderr and "old api" not in quiet.stderr
    assert "gemm_4bit" in loud.stderr and "accelerator" in loud.stderr and "old api" in loud.stderr


def test_gguf_with_report_and_gate(tiny, tmp_path, capsys):
    out = tmp_path / "tiny-f16.gguf"
    rc = main(["gguf", str(tiny), "--type", "f16", "-o", str(out), "--report", "--quick",
               "--max-ppl-increase", "5"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert out.is_file() and str(out) in captured.out
    # a quick report's increase is not comparable to the full one the gate is set for: it says so
    assert "quality gate (perplexity +5% at most) is not checked on a quick report" in captured.err
    assert "+≤5%: not checked (quick report)" in (tmp_path / "tiny-f16.gguf.report.md").read_text()
    from hearth.quantize.gguf import read_hearth_metadata
    meta = read_hearth_metadata(out)
    assert any("quality" in k for k in meta)  # the report went into the GGUF's metadata


def test_report_gate_fails_with_exit_1_and_the_parent_is_scored_once(tiny, tmp_path, capsys, monkeypatch):
    import torch
    from safetensors.torch import load_file, save_file

    from hearth.quantize.common import copy_tokenizer, quantized_manifest
    from hearth.runtime.checkpoint import write_manifest

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    state = load_file(str(tiny / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if v.dim() == 2 and "embed" not in k:
            state[k] = v + 0.5 * torch.randn(v.shape, generator=gen)
    save_file(state, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    (damaged / "config.json").write_text((tiny / "config.json").read_text())
    copy_tokenizer(tiny, damaged)
    write_manifest(damaged, quantized_manifest(tiny, "test-damage", {"noise": 0.5}))

    from hearth.quantize import report_eval
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    scored = []
    real = report_eval.run_parent
    monkeypatch.setattr(report_eval, "run_parent", lambda *a, **kw: scored.append(a[0]) or real(*a, **kw))

    assert main(["report", str(damaged), "--max-ppl-increase", "1"]) == 1
    err = capsys.readouterr().err
    assert "quality gate failed" in err and "perplexity" in err
    page = (damaged / "report.md").read_text()
    assert "+≤1%: fail" in page  # the saved report shows the gate it failed
    first = json.loads((damaged / "hearth.json").read_text())["metrics"]["quality"]
    assert first["gate_result"] == "fail" and first["max_ppl_increase"] == 1

    # the second report of the same parent reads its scores from the cache: the parent is not scored again
    assert main(["report", str(damaged), "--max-ppl-increase", "1"]) == 1
    err = capsys.readouterr().err
    assert len(scored) == 1 and "report cache" in err
    second = json.loads((damaged / "hearth.json").read_text())["metrics"]["quality"]
    for key in ("ppl", "ppl_parent", "kl_mean", "top1_agreement", "greedy_exact"):
        assert second[key] == first[key], key
    assert main(["report", str(damaged), "--no-cache"]) == 0  # no gate, measured afresh
    assert len(scored) == 2


# ----------------------------------------------------------------------------- recipes end to end


def test_recipe_builds_reports_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _write(tmp_path / "r.yaml", f"""
source: {tiny}
output_dir: out
report: {{quick: true}}
artifacts:
  - {{name: tiny-f16.gguf, method: gguf, type: f16, max_ppl_increase: 5}}
  - {{name: tiny-q8_0.gguf, method: gguf, type: q8_0}}
""")
    assert main(["recipe", str(recipe)]) == 0, capsys.readouterr().err
    out = tmp_path / "out"
    assert (out / "tiny-f16.gguf").is_file() and (out / "tiny-q8_0.gguf").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert [Path(r["artifact"]).name for r in summary] == ["tiny-f16.gguf", "tiny-q8_0.gguf"]
    f16, q8 = summary
    assert f16["kl_mean"] < q8["kl_mean"]  # f16 is closer to the fp32 parent than q8_0
    assert q8["size_bytes"] < f16["size_bytes"]
    assert (out / "summary.png").stat().st_size > 1000
    assert "tiny-q8_0.gguf" in (out / "summary.md").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp left behind

    capsys.readouterr()
    assert main(["recipe", str(recipe), "--only", "tiny-q8_0.gguf"]) == 0
    assert "already built" in capsys.readouterr().err

    assert main(["recipe", str(recipe), "--only", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


# ----------------------------------------------------------------------------- existing outputs, killed runs


def test_an_existing_output_is_refused_without_force_and_replaced_with_it(tiny, tmp_path, capsys):
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"a file the user cares about")
    assert main(["gguf", str(tiny), "--type", "f16", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert out.read_bytes() == b"a file the user cares about"
    assert err.count("\n") == 1 and str(out) in err and "--force" in err and "Traceback" not in err

    assert main(["gguf", str(tiny), "--type", "f16", "-o", str(out), "--force"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"
    assert [p.name for p in tmp_path.iterdir()] == ["mine.gguf"]


@pytest.mark.parametrize("command", [["bnb", "CKPT", "--int8"], ["gptq", "CKPT"],
                                     ["merge", "--base", "CKPT", "--adapter", "CKPT"]])
def test_every_writer_refuses_an_existing_output_before_any_work(tmp_path, capsys, command):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    missing = str(tmp_path / "no-such-checkpoint")  # never looked at: the output is checked first
    assert main([missing if a == "CKPT" else a for a in command] + ["-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err and "no-such-checkpoint" not in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_recipe_refuses_a_foreign_file_at_an_artifact_path(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = _write(tmp_path / "r.yaml", f"source: {tiny}\noutput_dir: out\nartifacts:\n"
                                         "  - {name: t.gguf, method: gguf, type: f16, report: false}\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "t.gguf").write_bytes(b"not built by this recipe")
    assert main(["recipe", str(recipe)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "out" / "t.gguf").read_bytes() == b"not built by this recipe"
    assert main(["recipe", str(recipe), "--force"]) == 0
    assert (tmp_path / "out" / "t.gguf").read_bytes()[:4] == b"GGUF"


# A conversion that is slow at its last step (llama.cpp's quantizer): it says when, and waits to be killed.
_SLOW = """
import sys, time
from hearth.quantize import gguf
real = gguf._llama_quantize
def slow(src, dst, qtype):
    real(src, dst, qtype)
    print("quantized", flush=True)
    time.sleep(120)
gguf._llama_quantize = slow
from hearth.quantize.cli import main
main(sys.argv[1:])
"""


def test_a_rerun_after_kill_9_leaves_no_temp_behind(tiny, tmp_path):
    out = tmp_path / "m.gguf"
    args = ["gguf", str(tiny), "--type", "q8_0", "-o", str(out)]
    p = subprocess.Popen([sys.executable, "-c", _SLOW, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "quantized"
        leftovers = [x.name for x in tmp_path.iterdir() if ".tmp-" in x.name]
        assert len(leftovers) == 2, leftovers  # the f16 folder and the q8_0 file being written
    finally:
        p.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        p.wait(timeout=30)
    assert not out.exists() and len([x for x in tmp_path.iterdir() if ".tmp-" in x.name]) == 2

    assert main(args) == 0
    assert out.is_file() and [x.name for x in tmp_path.iterdir()] == ["m.gguf"]
