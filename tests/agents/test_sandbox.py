"""The python sandbox: output comes back, and the limits (CPU, memory, wall clock, files, network,
processes, output size) hold. The audit hook's clear refusals are checked here; the kernel's confinement
beneath it, with an escape corpus, in test_sandbox_escapes.py."""

from __future__ import annotations

import os
import time

import pytest

from hearth.agents.tools import SandboxLimits, ToolRegistry, python_sandbox_tool, run_python
from hearth.agents.tools.sandbox import sandbox_unavailable_reason

pytestmark = pytest.mark.skipif(sandbox_unavailable_reason() is not None,
                                reason=f"no kernel confinement here: {sandbox_unavailable_reason()}")

LIMITS = SandboxLimits(cpu_s=1, memory_mb=256, wall_s=4.0, max_output_chars=2000)


async def test_print_and_final_expression_come_back():
    r = await run_python("import json, math, statistics\nprint(json.dumps({'pi': round(math.pi, 2)}))\n"
                         "statistics.mean([1, 2, 3])", LIMITS)
    assert r.ok and r.stopped == "exit" and r.stdout == '{"pi": 3.14}\n2\n'
    assert r.to_text() == '{"pi": 3.14}\n2'


async def test_files_inside_the_working_directory_are_fine():
    r = await run_python("open('a.txt', 'w').write('hello')\nimport os\nprint(os.listdir('.'), open('a.txt').read())",
                         LIMITS)
    assert r.ok and r.stdout == "['a.txt'] hello\n"


async def test_infinite_loop_is_stopped_by_the_cpu_limit():
    t0 = time.monotonic()
    r = await run_python("while True:\n    pass", SandboxLimits(cpu_s=1, wall_s=30.0))
    assert r.stopped == "cpu_time" and not r.ok  # the CPU limit, not the wall clock, ended it
    assert time.monotonic() - t0 < 20.0
    assert "CPU time limit" in r.to_text()


async def test_sleeping_forever_is_killed_at_the_wall_clock():
    t0 = time.monotonic()
    r = await run_python("import time\nprint('before', flush=True)\ntime.sleep(60)", SandboxLimits(wall_s=1.0))
    assert r.stopped == "wall_time" and r.returncode == -9
    assert r.stdout == "before\n"  # what it printed before the kill is kept
    assert time.monotonic() - t0 < 3.0


async def test_two_gigabytes_are_refused_by_the_memory_limit():
    r = await run_python("x = bytearray(2 * 1024**3)\nprint('allocated')", LIMITS)
    assert r.stopped == "memory" and "MemoryError" in r.stderr and "allocated" not in r.stdout


@pytest.mark.parametrize("code, refusal", [
    ("print(open('/etc/passwd').read())", "reading '/etc/passwd'"),
    ("import os\nos.listdir('/')", "os.listdir on '/'"),
    ("open('/tmp/hearth-escape.txt', 'w')", "writing '/tmp/hearth-escape.txt'"),
    ("import os\nos.symlink('/etc/passwd', 'p')", "os.symlink on '/etc/passwd'"),
    ("import socket\nsocket.socket().connect(('127.0.0.1', 9))", "network access"),
    ("import socket\nsocket.create_connection(('example.com', 80))", "not allowed"),
    ("import os\nos.system('echo hi')", "os.system"),
    ("import subprocess", "importing 'subprocess'"),
    ("import os\nos.fork()", "os.fork"),
    ("import os\nos.execv('/bin/sh', ['sh'])", "os.exec"),
    ("import os\nos.kill(1, 9)", "os.kill"),
    ("import ctypes", "importing 'ctypes'"),
    ("import gc", "importing 'gc'"),
    ("import pwd", "importing 'pwd'"),
    ("import sys\nsys.settrace(lambda *a: None)", "sys.settrace"),
])
async def test_escapes_are_refused(code, refusal):
    r = await run_python(code, LIMITS)
    assert not r.ok and "PermissionError: sandbox: " in r.stderr and refusal in r.stderr, r.stderr
    assert "root:" not in r.stdout + r.stderr
    assert not os.path.exists("/tmp/hearth-escape.txt")


async def test_environment_is_empty_and_stdlib_only():
    r = await run_python("import os, sys\nprint(sorted(k for k in os.environ if k != 'LC_CTYPE'))\n"
                         "print(any('site-packages' in p for p in sys.path))\n"
                         "import importlib.util\nprint(importlib.util.find_spec('numpy'))", LIMITS)
    assert r.ok and r.stdout == "[]\nFalse\nNone\n", r.stdout + r.stderr
    assert "HEARTH_HOME" not in r.stdout


async def test_output_is_capped_and_a_flood_is_killed():
    r = await run_python("print('y' * 5000)", LIMITS)
    assert r.truncated and len(r.stdout) == LIMITS.max_output_chars and "[output truncated]" in r.to_text()
    t0 = time.monotonic()
    flood = await run_python("while True:\n    print('x' * 10000)", LIMITS)
    assert flood.stopped == "output" and time.monotonic() - t0 < 2.0


async def test_the_tool_reports_errors_to_the_model():
    reg = ToolRegistry([python_sandbox_tool(LIMITS)])
    ok = await reg.call("python", {"code": "print(6 * 7)"})
    assert ok.ok and ok.content == "42"
    bad = await reg.call("python", {"code": "1 / 0"})
    assert not bad.ok and bad.content.startswith("error: stderr:") and "ZeroDivisionError" in bad.content
    assert "_sandbox_child" not in bad.content and '"<string>"' not in bad.content  # no bootstrap frames
    syntax = await reg.call("python", {"code": "def ("})
    assert not syntax.ok and "SyntaxError" in syntax.content


def _sandbox_pids() -> set[str]:
    """Processes whose command line carries a sandbox working directory (hearth-sandbox-...)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"hearth-sandbox-" in f.read():
                    found.add(pid)
        except OSError:
            continue  # it ended while we looked
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the child")
async def test_cancellation_kills_the_process():
    import asyncio

    before = _sandbox_pids()
    task = asyncio.create_task(run_python("import time\ntime.sleep(30)", SandboxLimits(wall_s=30)))
    for _ in range(100):  # until the child is up
        await asyncio.sleep(0.05)
        if _sandbox_pids() - before:
            break
    assert _sandbox_pids() - before, "the sandbox process never started"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _sandbox_pids() - before == set()
