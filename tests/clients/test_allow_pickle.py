"""The pickle refusal names a flag the command really has, and that flag loads the checkpoint.

    python -m pytest tests/clients/test_allow_pickle.py -q
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hearth.clients.cli import main as hearth
from hearth.quantize.cli import main as quantize


@pytest.fixture(scope="module")
def pickled(tiny_llama, tmp_path_factory) -> Path:
    """The tiny model with its weights as pytorch_model.bin (torch.save) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    d = tmp_path_factory.mktemp("pickled") / "tiny"
    shutil.copytree(tiny_llama, d)
    torch.save(load_file(str(d / "model.safetensors")), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    return d


def test_hearth_generate_names_its_flag_and_the_flag_loads_the_model(pickled, capsys, monkeypatch):
    from hearth.runtime.backends.transformers import TransformersBackend

    monkeypatch.setattr(TransformersBackend, "_default_kv_gb", lambda self: 0.01)  # a tiny model, a tiny cache
    argv = ["generate", "--model", str(pickled), "--prompt", "hi", "--max-tokens", "3", "--temperature", "0"]
    assert hearth(argv) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "pass --allow-pickle" in err and "Traceback" not in err

    assert hearth(argv + ["--allow-pickle"]) == 0, capsys.readouterr().err
    assert "3 tokens" in capsys.readouterr().err


def test_quantize_does_not_suggest_a_flag_it_lacks(pickled, tmp_path, capsys):
    assert quantize(["gguf", str(pickled), "--type", "f16", "-o", str(tmp_path / "o.gguf")]) == 2
    err = capsys.readouterr().err
    assert "pytorch_model.bin" in err and "safetensors" in err and "allow" not in err.replace(str(pickled), "")
    with pytest.raises(SystemExit):  # and the flag is indeed not there
        quantize(["gguf", str(pickled), "--allow-pickle", "-o", str(tmp_path / "o.gguf")])
