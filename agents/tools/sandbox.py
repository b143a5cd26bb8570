"""The `python` tool: run a short Python program in a separate, confined process. OFF by default.

    registry = default_registry(sandbox=True)                  # registers "python"
    out = await run_python("print(sum(range(10)))")            # SandboxResult(stdout="45\n", ...)
    tool = python_sandbox_tool(SandboxLimits(cpu_s=2, memory_mb=256))

Each run gets `python -I -S -B` (isolated, stdlib only, no site-packages) in a fresh temporary
directory as cwd, an empty environment and its own process group, with:
- CPU time (RLIMIT_CPU), address space (RLIMIT_AS), file size (RLIMIT_FSIZE) limits;
- a wall-clock timeout, after which the whole process group is killed;
- stdout and stderr capped;
- confinement by the kernel, set by the process itself (_sandbox_child.confine) before the program runs:
  1. every capability dropped (a root sandbox included) and no_new_privs set;
  2. Landlock: files may be read only in the standard library, the system's shared libraries and a few
     harmless files (/dev/null, /dev/urandom, time zones), and written, created, renamed, linked or
     truncated only inside the temporary directory. Landlock checks the path a call reaches however it is
     named, so openat/renameat/linkat relative to any directory descriptor, symlinks, hard links and
     /proc/self/root or /proc/PID/... all end at the same refusal. From ABI 4 on TCP bind/connect are
     refused too, from ABI 6 on signals to processes outside the sandbox and abstract unix sockets;
  3. seccomp, a filter in the kernel's BPF that answers EPERM to socket() (socketpair(AF_UNIX) stays, it
     reaches nothing outside), fork, vfork, clone without CLONE_THREAD, execve, execveat, ptrace,
     process_vm_readv/writev, signals to or priorities of any other process, setting rlimits, namespaces
     and mounts, open_by_handle_at, bpf, perf_event_open, userfaultfd, io_uring (which would bypass the
     filter), System V and POSIX IPC, keyrings, modules, kexec, clocks, and changes of file metadata,
     which Landlock does not cover (chmod, chown, utime, xattrs, the flag-setting ioctls: so shutil.copy
     fails where shutil.copyfile works);
     clone3 answers ENOSYS so libc falls back to clone, whose flags the filter can read. Threads are
     allowed: they share the process's confinement.
  If any step fails the process exits before running anything ("sandbox: cannot confine the process").
- an audit hook that turns the common mistakes (opening /etc/passwd, importing subprocess) into clear
  messages. It is not the boundary (PEP 578 says hooks cannot be one: os.open with dir_fd bypassed it).

Why these: they need no privilege (no root, no setuid helper, no user namespaces, which containers and
Ubuntu's AppArmor often forbid), no package (ctypes and raw syscalls), about 10 ms per run, and refuse
a path whatever route a call takes to it. bubblewrap needs user namespaces or a setuid helper, and a
mount namespace hides files rather than refusing a route to them. The kernel must offer Landlock
(Linux 5.13+ built with CONFIG_SECURITY_LANDLOCK and "landlock" in its active LSM list) and seccomp
filters; below Landlock ABI 3 (Linux 6.2), which cannot refuse truncation, the seccomp filter refuses
truncate() and O_TRUNC on read-only opens instead. Where either is missing, or on an architecture other than x86_64 and
aarch64 (the filter's syscall tables), enabling the sandbox raises SandboxUnavailable saying what is
missing, and sandbox_unavailable_reason() says it without raising.
"""

from __future__ import annotations

import asyncio
import functools
import os
import platform
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import _sandbox_child
from .registry import Tool, ToolError

__all__ = ["SandboxLimits", "SandboxResult", "SandboxUnavailable", "run_python", "python_sandbox_tool",
           "sandbox_unavailable_reason"]

_CHILD = Path(__file__).with_name("_sandbox_child.py")
# test switches passed to the child (see _sandbox_child's docstring); empty in use
_CHILD_OPTIONS: dict = {}
_READ_CHUNK = 65536


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one run. `max_output_chars` caps stdout and stderr each."""

    cpu_s: int = 5
    memory_mb: int = 512
    wall_s: float = 10.0
    max_output_chars: int = 8000
    max_file_mb: int = 16
    max_code_chars: int = 50_000

    def __post_init__(self):
        for name in ("cpu_s", "memory_mb", "max_output_chars", "max_file_mb", "max_code_chars"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"SandboxLimits.{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.wall_s, (int, float)) or self.wall_s <= 0:
            raise ValueError(f"SandboxLimits.wall_s must be > 0, got {self.wall_s!r}")
        if self.memory_mb < 64:
            raise ValueError("SandboxLimits.memory_mb must be at least 64 (the interpreter needs it)")


@dataclass
class SandboxResult:
    """What a run printed and why it ended. `stopped`: "exit", "cpu_time", "memory", "wall_time",
    "output" (killed for printing far more than the cap) or "signal"."""

    stdout: str
    stderr: str
    returncode: int | None
    stopped: str
    elapsed_s: float
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.stopped == "exit" and self.returncode == 0

    def to_text(self) -> str:
        """The tool message: stdout, then stderr and the reason it stopped when it did not end cleanly."""
        parts = []
        if self.stdout:
            parts.append(self.stdout.rstrip("\n"))
        if self.stderr.strip():
            parts.append("stderr:\n" + self.stderr.rstrip("\n"))
        if self.truncated:
            parts.append("[output truncated]")
        notes = {"cpu_time": "stopped: the CPU time limit was exceeded",
                 "memory": "stopped: the memory limit was exceeded",
                 "wall_time": "stopped: the time limit was exceeded (the process was killed)",
                 "output": "stopped: the program printed too much output",
                 "signal": f"stopped by signal {-(self.returncode or 0)}"}
        if self.stopped in notes:
            parts.append(notes[self.stopped])
        elif self.returncode:
            parts.append(f"exit status {self.returncode}")
        return "\n".join(parts) if parts else "(no output)"


class SandboxUnavailable(RuntimeError):
    """This machine cannot confine the sandbox process; the message says what is missing."""


def _syscall(nr: int, *args) -> tuple[int, int]:
    """(result, errno) of a raw syscall; args are ints or ctypes pointers."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))
    return result, (ctypes.get_errno() if result < 0 else 0)


def _landlock_abi() -> tuple[int, int]:
    """(Landlock ABI version, 0) or (0, errno) from landlock_create_ruleset(NULL, 0, VERSION)."""
    abi, err = _syscall(444, None, 0, 1)
    return (abi, 0) if abi > 0 else (0, err)


def _seccomp_filters(machine: str) -> int:
    """0 when seccomp filters returning an errno are available, else the errno of asking."""
    import ctypes

    action = ctypes.c_uint32(_sandbox_child.RET_ERRNO)
    nr = _sandbox_child.SYSCALLS[machine][1]["seccomp"]
    return _syscall(nr, 2, 0, ctypes.byref(action))[1]  # SECCOMP_GET_ACTION_AVAIL


@functools.cache
def sandbox_unavailable_reason() -> str | None:
    """None when this machine can confine the sandbox (Landlock and seccomp, see the module docstring),
    else why not, in words. Asks the kernel once per process; changes nothing."""
    if sys.platform != "linux":
        return f"the python sandbox needs Linux (Landlock and seccomp); this is {sys.platform}"
    machine = platform.machine()
    if machine not in _sandbox_child.SYSCALLS:
        return (f"the python sandbox's seccomp filter knows only {', '.join(_sandbox_child.SYSCALLS)}; "
                f"this machine is {machine}")
    abi, err = _landlock_abi()
    if not abi:
        why = {38: "this kernel has no Landlock (it needs Linux 5.13 or newer built with "
                   "CONFIG_SECURITY_LANDLOCK)",
               95: "Landlock is built into this kernel but not enabled (add landlock to the lsm= boot parameter)",
               1: "Landlock is blocked here, probably by the container's seccomp profile"}
        return f"the python sandbox needs Landlock: {why.get(err, os.strerror(err))}"
    err = _seccomp_filters(machine)
    if err:
        return f"the python sandbox needs seccomp filters (CONFIG_SECCOMP_FILTER): {os.strerror(err)}"
    return None


def _check_platform() -> None:
    reason = sandbox_unavailable_reason()
    if reason:
        raise SandboxUnavailable(reason + "; the sandbox stays off on this machine")


async def _drain(stream: asyncio.StreamReader, cap_bytes: int, hard_cap: int, on_flood) -> tuple[bytes, bool]:
    """(the first cap_bytes, truncated). Reads to EOF so the child never blocks on a full pipe; past
    hard_cap it calls on_flood (which kills the child, so EOF follows)."""
    kept, total = bytearray(), 0
    while chunk := await stream.read(_READ_CHUNK):
        total += len(chunk)
        if len(kept) < cap_bytes:
            kept.extend(chunk[: cap_bytes - len(kept)])
        if total > hard_cap:
            on_flood()
        await asyncio.sleep(0)  # a fast writer must not starve the loop (and our own timeout)
    return bytes(kept), total > cap_bytes


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child is its own group leader (start_new_session)
        except ProcessLookupError:
            pass  # it ended on its own meanwhile


async def run_python(code: str, limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` in a new sandboxed interpreter and return what it printed."""
    _check_platform()
    limits = limits or SandboxLimits()
    if len(code) > limits.max_code_chars:
        raise ValueError(f"the program is too long ({len(code)} characters, limit {limits.max_code_chars})")
    cap = limits.max_output_chars * 4  # bytes: a character is at most 4 in UTF-8
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hearth-sandbox-") as tmp:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD.read_text(), repr({
                "tmp": tmp, "cpu_s": limits.cpu_s, "memory": limits.memory_mb * 2**20,
                "file_bytes": limits.max_file_mb * 2**20, **_CHILD_OPTIONS}),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=tmp, env={}, start_new_session=True, close_fds=True)
        state = {"stopped": "exit"}

        def flood() -> None:
            state["stopped"] = "output"
            _kill_group(proc)

        readers: list[asyncio.Task] = []
        try:
            try:
                proc.stdin.write(code.encode("utf-8", "surrogatepass"))
                await proc.stdin.drain()
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass  # the interpreter died before reading its program; its stderr says why
            readers = [asyncio.create_task(_drain(s, cap, cap * 50, flood)) for s in (proc.stdout, proc.stderr)]
            try:
                async with asyncio.timeout(limits.wall_s):
                    await proc.wait()
            except TimeoutError:
                state["stopped"] = "wall_time"
                _kill_group(proc)
                await proc.wait()
            # the pipes close when the process (group) is gone; keep what it printed before
            (out, out_cut), (err, err_cut) = await asyncio.gather(*readers)
        except BaseException:
            _kill_group(proc)  # cancelled or failed: never leave the process running
            for r in readers:
                r.cancel()
            raise
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                await proc.wait()
    stopped = state["stopped"]
    rc = proc.returncode
    err_text = err.decode("utf-8", "replace")
    if rc == _sandbox_child.CONFINE_FAILED and err_text.startswith("sandbox: cannot confine"):
        raise SandboxUnavailable(err_text.strip() + "; nothing ran")
    if stopped == "exit" and rc is not None and rc < 0:
        stopped = "cpu_time" if -rc in (signal.SIGXCPU, signal.SIGKILL) else "signal"
    if stopped == "exit" and rc and "MemoryError" in err_text:
        stopped = "memory"
    out_text = out.decode("utf-8", "replace")
    cut = out_cut or err_cut or len(out_text) > limits.max_output_chars or len(err_text) > limits.max_output_chars
    # the start of stdout and the end of stderr (where a traceback's error line is) matter most
    return SandboxResult(out_text[: limits.max_output_chars], err_text[-limits.max_output_chars:], rc, stopped,
                         round(time.monotonic() - t0, 3), cut)


def python_sandbox_tool(limits: SandboxLimits | None = None, *, name: str = "python") -> Tool:
    """The `python` Tool over run_python with these limits. Raises SandboxUnavailable where the kernel
    cannot confine it (see sandbox_unavailable_reason)."""
    _check_platform()
    limits = limits or SandboxLimits()

    async def python(code: str) -> str:
        """Run a short Python program (standard library only, no network, no files outside its own
        temporary directory) and return what it printed. The value of a final expression is printed
        too. Use it for computations, data manipulation, or checking an idea.

        Args:
            code: the complete Python program
        """
        result = await run_python(code, limits)
        if not result.ok:  # a traceback or a limit: the model sees "error: ..."
            raise ToolError(result.to_text())
        return result.to_text()

    t = Tool.from_function(python, name=name, timeout_s=limits.wall_s + 10.0)
    t.parameters["properties"]["code"]["maxLength"] = limits.max_code_chars
    return t
