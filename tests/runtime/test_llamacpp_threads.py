"""llama.cpp's OpenMP threads spin only briefly at a barrier, then sleep (issue 16: with libgomp's own
long spin, decode fell to ~1 tok/s on a busy CPU), unless the user chose otherwise. Checked in a fresh process against the OpenMP
runtime llama.cpp actually loaded: libgomp reads its settings once, when it is loaded.

    python -m pytest tests/runtime/test_llamacpp_threads.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hearth.runtime.backends.llamacpp_threads import apply_openmp_defaults

# In a fresh process: import hearth's llama.cpp backend first (as the engine, `hearth serve` and
# `hearth edge` do), then ask the libgomp that llama.cpp loaded for its wait settings.
PROBE = r"""
import ctypes, sys
import hearth.runtime.backends.llamacpp
import llama_cpp
if b"OPENMP = 1" not in llama_cpp.llama_print_system_info():
    print("NO-OPENMP"); sys.exit(0)
maps = open("/proc/self/maps").read()
assert "libgomp" in maps, "llama.cpp says OPENMP = 1 but no libgomp is loaded"
ctypes.CDLL("libgomp.so.1").omp_display_env(1)  # the one already loaded: same soname
"""


def omp_settings(env_extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if "NO-OPENMP" in proc.stdout:
        pytest.skip("this llama-cpp-python is built without OpenMP: the wait policy does not apply")
    settings = {}
    for line in proc.stderr.splitlines():  # omp_display_env writes `  NAME = 'value'` lines to stderr
        name, sep, value = line.strip().partition(" = ")
        if sep:
            settings[name] = value.strip("'")
    return settings


def test_llama_cpp_threads_spin_briefly_at_barriers_by_default():
    settings = omp_settings({})
    assert settings["GOMP_SPINCOUNT"] == "1000"  # libgomp's own default spins 300000 rounds


@pytest.mark.parametrize("env, spin", [({"GOMP_SPINCOUNT": "300000"}, "300000"),
                                       ({"OMP_WAIT_POLICY": "passive"}, "0"),
                                       ({"OMP_WAIT_POLICY": "active"}, "30000000000")])
def test_a_users_own_openmp_setting_is_kept(env, spin):
    assert omp_settings(env)["GOMP_SPINCOUNT"] == spin


def test_apply_openmp_defaults_sets_only_what_the_user_left_unset():
    env: dict[str, str] = {}
    assert apply_openmp_defaults(env) == {"GOMP_SPINCOUNT": "1000"}
    assert env == {"GOMP_SPINCOUNT": "1000"}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}):
        env = dict(mine)
        assert apply_openmp_defaults(env) == {} and env == mine
