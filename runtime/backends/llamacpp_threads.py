"""How llama.cpp's CPU threads wait for each other: set once per process, before llama_cpp loads.

    from .llamacpp_threads import apply_openmp_defaults
    apply_openmp_defaults()  # then: import llama_cpp

llama-cpp-python's default build runs ggml's CPU threads under OpenMP (libgomp), and ggml meets
them at an OpenMP barrier after every op of the graph, hundreds per token. Left alone, libgomp spins
300000 rounds (milliseconds) at a barrier before it sleeps; when other processes want the cores, a
waiting thread spins its time slices away while the thread it waits for is off the CPU, and decode
fell from ~110 to ~0.2 tok/s on 2 cores (issue 16). Spinning 1000 rounds (GOMP_SPINCOUNT=1000) keeps
the quiet speed, since a partner that is running arrives within it, and then sleeps, giving the core
back. Sleeping at once (OMP_WAIT_POLICY=PASSIVE) halves the quiet speed. `hearth bench contention`
measures all of these; the table is in bench/RESULTS.md.

libgomp reads these variables once, when it is loaded, so they must be in the environment before
`import llama_cpp` (a process that loaded torch first shares torch's libgomp, already set up). A
value the user set for either variable wins: OMP_WAIT_POLICY=ACTIVE, or GOMP_SPINCOUNT=300000 for
libgomp's own default. Builds without OpenMP (GGML_OPENMP=OFF) ignore them.
"""

from __future__ import annotations

import os
from typing import MutableMapping

OPENMP_DEFAULTS = {"GOMP_SPINCOUNT": "1000"}
# a user who set any of these chose how libgomp waits: leave all of them alone
USER_CHOICE = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_openmp_defaults(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Put OPENMP_DEFAULTS into `environ` unless the user set one of USER_CHOICE; returns what was set."""
    if any(environ.get(k) for k in USER_CHOICE):
        return {}
    environ.update(OPENMP_DEFAULTS)
    return dict(OPENMP_DEFAULTS)
