"""What `hearth` itself prints and reaches: --version, --verbose anywhere, no library noise, no model hub.

    python -m pytest tests/clients/test_cli_output.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hearth.clients.cli import main
from tests.offline_child import NO_NETWORK, REPORT_NETWORK

# Runs `hearth ARGS` as a user would (HF_HUB_OFFLINE unset), then imports bitsandbytes as every command that
# loads an int8/nf4 model does: bitsandbytes probes a kernel hub on import. Every network lookup is recorded.
_CHILD = NO_NETWORK + """
from hearth.clients.cli import main
rc = main(sys.argv[1:])
import bitsandbytes.functional
""" + REPORT_NETWORK + "sys.exit(rc)\n"


def _hearth_child(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_VERBOSITY")}
    env["HEARTH_HOME"] = str(tmp_path / "home")
    return subprocess.run([sys.executable, "-c", _CHILD, *args], env=env, capture_output=True, text=True,
                          timeout=180, cwd=tmp_path)


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("hearth ")


def test_a_command_reaches_no_model_hub_and_prints_no_library_noise(tmp_path):
    p = _hearth_child(["plan", "smollm2-135m", "--memory-gb", "64"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "NETWORK: []" in p.stderr, p.stderr[-3000:]
    for noise in ("kernels-community", "trust_remote_code", "Enum subclass", "Setting accelerator", "WARNING"):
        assert noise not in p.stderr + p.stdout, p.stderr[-3000:]


def test_verbose_may_stand_after_the_command(tmp_path):
    p = _hearth_child(["plan", "smollm2-135m", "--memory-gb", "64", "--verbose"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "FITS" in p.stdout
    assert "NETWORK: []" in p.stderr  # loud, still offline
    assert "kernels-community" in p.stderr  # bitsandbytes' own warning is back
