"""Manifest, content hash and the load-safety gate, on tiny files made here."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from hearth.runtime import checkpoint
from hearth.runtime.checkpoint import (MANIFEST_NAME, Manifest, Parent, check_trust_remote_code,
                                       content_hash, inspect_checkpoint, read_manifest,
                                       update_metrics, write_manifest)
from hearth.runtime.errors import ModelLoadError, ModelNotFoundError, UnsafeCheckpointError


def make_hf_dir(d: Path, name: str = "model.safetensors") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({"embed.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "norm.weight": np.ones(4, dtype=np.float16)}, str(d / name))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4}))
    return d


def make_gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + b"\0" * 32)
    return path


# ----------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    m = Manifest(stage="sft", method="sft-lora", parent=Parent("/models/base", "ab" * 32),
                 parameters={"lr": 2e-4, "rank": 8}, data_hashes={"alpaca": "cd" * 32},
                 metrics={"loss": 1.25, "note": "héllo"})
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path)
    assert back == m
    raw = json.loads((tmp_path / MANIFEST_NAME).read_text(encoding="utf-8"))
    assert raw["parent"] == {"path": "/models/base", "content_hash": "ab" * 32}
    assert raw["format_version"] == 1 and raw["created"]
    assert "python" in back.tool_versions and "hearth-llm" in back.tool_versions
    # A file inside the checkpoint dir shares its manifest.
    (tmp_path / "model.gguf").write_bytes(b"x")
    assert read_manifest(tmp_path / "model.gguf") == m


def test_manifest_parent_dict_and_validation():
    m = Manifest(stage="quantized", parent={"path": "p", "content_hash": "h"})
    assert m.parent == Parent("p", "h")
    with pytest.raises(ValueError, match="stage"):
        Manifest(stage="finetune")
    with pytest.raises(ValueError, match="newer"):
        Manifest.from_dict({"stage": "base", "format_version": 99})


def test_read_manifest_missing_and_corrupt(tmp_path):
    assert read_manifest(tmp_path) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelLoadError, match=MANIFEST_NAME):
        read_manifest(tmp_path)


def test_write_manifest_is_atomic(tmp_path, monkeypatch):
    write_manifest(tmp_path, Manifest(stage="base", method="first"))
    before = (tmp_path / MANIFEST_NAME).read_bytes()

    # Not serializable: fails before touching the file.
    with pytest.raises(TypeError):
        write_manifest(tmp_path, Manifest(stage="base", metrics={"bad": object()}))
    # Crash at the final rename: the old manifest stays whole and no temp file is left.
    def boom(*a, **k):
        raise OSError("disk gone")
    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError):
        write_manifest(tmp_path, Manifest(stage="sft", method="second"))
    assert (tmp_path / MANIFEST_NAME).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]


def test_update_metrics(tmp_path):
    write_manifest(tmp_path, Manifest(stage="rm", metrics={"acc": 0.5}))
    update_metrics(tmp_path, acc=0.75, ppl=12.5)
    assert read_manifest(tmp_path).metrics == {"acc": 0.75, "ppl": 12.5}
    with pytest.raises(ModelNotFoundError):
        update_metrics(tmp_path / "nowhere", x=1)


# ----------------------------------------------------------------------------- content hash


def test_content_hash_file_is_sha256(tmp_path, monkeypatch):
    f = make_gguf(tmp_path / "m.gguf")
    expected = hashlib.sha256(f.read_bytes()).hexdigest()
    assert content_hash(f) == expected
    monkeypatch.setattr(checkpoint, "_CHUNK", 7)  # many small reads give the same digest
    assert content_hash(f) == expected


def test_content_hash_dir_stable_and_selective(tmp_path):
    d = make_hf_dir(tmp_path / "a")
    h = content_hash(d)
    assert h == content_hash(d) and len(h) == 64
    # Same files written in another order elsewhere hash the same.
    e = tmp_path / "b"
    e.mkdir()
    (e / "config.json").write_bytes((d / "config.json").read_bytes())
    (e / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    assert content_hash(e) == h
    # Docs, tokenizer and the manifest are not part of the identity; weights and config are.
    (d / "README.md").write_text("hi")
    write_manifest(d, Manifest(stage="base"))
    assert content_hash(d) == h
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    assert content_hash(d) != h
    with pytest.raises(ModelNotFoundError):
        content_hash(tmp_path / "missing")


# ----------------------------------------------------------------------------- inspect


def test_inspect_hf_safetensors(tmp_path):
    d = make_hf_dir(tmp_path / "m")
    (d / "training_args.bin").write_bytes(pickle.dumps({"lr": 1}))  # ignored beside safetensors
    info = inspect_checkpoint(d)
    assert info.format == "hf-safetensors"
    assert info.weight_files == [d / "model.safetensors"]
    assert info.num_tensors == 2 and info.config["model_type"] == "llama"


def test_safetensors_found_by_content_not_name(tmp_path):
    d = make_hf_dir(tmp_path / "m", name="weights.dat")
    info = inspect_checkpoint(d)
    assert info.format == "hf-safetensors" and info.weight_files == [d / "weights.dat"]


def test_truncated_safetensors_names_the_file(tmp_path):
    d = make_hf_dir(tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-10])  # data cut short
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        inspect_checkpoint(d)
    f.write_bytes(data[:20])  # cut inside the header
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        inspect_checkpoint(d)
    f.write_bytes(b"\x01")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        inspect_checkpoint(d)


def test_missing_shard(tmp_path):
    d = make_hf_dir(tmp_path / "m", name="model-00001-of-00002.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        inspect_checkpoint(d)


def test_pickle_only_refused_unless_allowed(tmp_path):
    d = tmp_path / "old"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with zipfile.ZipFile(d / "extra.pt", "w") as z:  # torch.save's zip layout
        z.writestr("archive/data.pkl", pickle.dumps({}))
    (d / "config.json").write_text("{}")
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True") as e:  # the real Python opt-in
        inspect_checkpoint(d)
    assert "pytorch_model.bin" in str(e.value) and "--allow-pickle" not in str(e.value)
    # a command line names its own flag, or says it has none; the files stay named either way
    assert "pass --allow-pickle if you trust" in str(e.value.naming("--allow-pickle"))
    none = str(e.value.naming(None))
    assert "--allow-pickle" not in none and "allow_pickle" not in none and "does not load pickle" in none
    assert "pytorch_model.bin" in none
    info = inspect_checkpoint(d, allow_pickle=True)
    assert info.format == "pickle" and {p.name for p in info.weight_files} == {"pytorch_model.bin", "extra.pt"}
    with pytest.raises(UnsafeCheckpointError):
        inspect_checkpoint(d / "pytorch_model.bin")


def test_missing_path(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError, match="such-model"):
        inspect_checkpoint(missing)


def test_gguf_detected_by_magic(tmp_path):
    f = make_gguf(tmp_path / "weights.bin")  # misnamed: looks like pickle by name
    info = inspect_checkpoint(f)
    assert info.format == "gguf" and info.model_file == f
    d = tmp_path / "dir"
    make_gguf(d / "model.data")
    assert inspect_checkpoint(d).format == "gguf"
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match="fake.gguf"):
        inspect_checkpoint(fake)
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF\x03\0")
    with pytest.raises(ModelLoadError, match="truncated"):
        inspect_checkpoint(short)


def test_empty_dir(tmp_path):
    with pytest.raises(ModelLoadError, match="no model weights"):
        inspect_checkpoint(tmp_path)


def test_trust_remote_code(tmp_path):
    cfg = {"model_type": "custom", "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    with pytest.raises(UnsafeCheckpointError, match="--trust-remote-code"):
        check_trust_remote_code(cfg, allow=False)
    check_trust_remote_code(cfg, allow=True)
    check_trust_remote_code({"model_type": "llama"}, allow=False)
    d = make_hf_dir(tmp_path / "m")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsafeCheckpointError):
        inspect_checkpoint(d)
    assert inspect_checkpoint(d, trust_remote_code=True).format == "hf-safetensors"


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_read_gguf_metadata(tmp_path):
    kv = (_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("llama")
          + _gguf_string("llama.context_length") + struct.pack("<I", 4) + struct.pack("<I", 8192)
          + _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2)
          + _gguf_string("a") + _gguf_string("bc")
          + _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0, 1, 2)
          + _gguf_string("tokenizer.chat_template") + struct.pack("<I", 8) + _gguf_string("{{ x }} ✓"))
    f = tmp_path / "tiny.bin"
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + kv)
    assert checkpoint.read_gguf_metadata(f) == {
        "general.architecture": "llama", "llama.context_length": 8192, "tokenizer.ggml.tokens.length": 2,
        "tokenizer.ggml.scores.length": 3, "tokenizer.chat_template": "{{ x }} ✓"}
    f.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 5) + kv[:-5])
    with pytest.raises(ModelLoadError, match="truncated GGUF file .*tiny.bin"):
        checkpoint.read_gguf_metadata(f)
