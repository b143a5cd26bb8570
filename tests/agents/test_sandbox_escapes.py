"""The python sandbox's escape corpus: each attempt runs through the real sandbox and must fail, and
afterwards nothing outside its temporary directory has changed, no connection arrived, no process was
hurt. The attempts run three ways: with the kernel's confinement alone (the audit hook off, so ctypes and
friends reach the kernel), the same on a simulated Landlock ABI 1 kernel (no truncate right: the seccomp
filter covers it), and as the tool runs them (audit hook on top). Where the kernel offers no confinement,
enabling the sandbox is refused with a message saying what is missing, and a child that cannot confine
itself runs nothing."""

from __future__ import annotations

import os
import platform
import socket
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from hearth.agents.tools import SandboxLimits, default_registry, python_sandbox_tool, run_python
from hearth.agents.tools import _sandbox_child, sandbox
from hearth.agents.tools.sandbox import SandboxUnavailable

confined = pytest.mark.skipif(sandbox.sandbox_unavailable_reason() is not None,
                              reason=f"no kernel confinement here: {sandbox.sandbox_unavailable_reason()}")

LIMITS = SandboxLimits(cpu_s=2, memory_mb=256, wall_s=10.0, max_output_chars=4000)
STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])
PROBE = "hearth_escape_probe.py"  # must never appear in the stdlib folder
LAYERS = {"kernel": {"audit": False}, "kernel-abi1": {"audit": False, "abi_max": 1}, "tool": {}}


def _nr(name: str) -> int:
    return _sandbox_child.SYSCALLS[platform.machine()][1][name]


LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
# {T}: a file outside (content "original"), {D}: its folder, {N}: a new file there, {S}: the stdlib
# folder, {P}: PROBE, {V}: a file in the stdlib folder (readable in the sandbox, never writable)
ESCAPES = {
    "dir_fd open (O_PATH dir outside)": "import os\nfd = os.open({D!r}, os.O_PATH)\n"
                                        "os.write(os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'x')",
    "dir_fd open in the stdlib": "import os\nfd = os.open({S!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
                                 "os.write(os.open({P!r}, os.O_WRONLY | os.O_CREAT, dir_fd=fd), b'x')",
    "rename with dst_dir_fd": "import os\nopen('m.py', 'w').write('x')\n"
                              "fd = os.open({S!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
                              "os.rename('m.py', {P!r}, dst_dir_fd=fd)",
    "rename to a folder outside": "import os\nopen('m.py', 'w').write('x')\nos.rename('m.py', {N!r})",
    "rename over a readable file": "import os\nopen('m.py', 'w').write('x')\nos.replace('m.py', {V!r})",
    "openat via ctypes": LIBC + "fd = os.open({S!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
                                "n = libc.openat(fd, {P!r}.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
                                "assert n >= 0, os.strerror(ctypes.get_errno())",
    "open via ctypes syscall": LIBC + "n = libc.syscall({openat}, -100, {N!r}.encode(), os.O_WRONLY | os.O_CREAT,"
                                      " 0o644)\nassert n >= 0, os.strerror(ctypes.get_errno())",
    "symlink to outside, then write": "import os\nos.symlink({T!r}, 'l')\nopen('l', 'w').write('pwned')",
    "symlink into the stdlib, then write": "import os\nos.symlink({S!r}, 'l')\nopen('l/' + {P!r}, 'w')",
    "hard link to outside, then write": "import os\nos.link({T!r}, 'h')\nopen('h', 'w').write('pwned')",
    "hard link to a readable file, then write": "import os\nos.link({V!r}, 'h')\nopen('h', 'w').write('pwned')",
    "/proc/self/root": "open('/proc/self/root' + {T!r}, 'w').write('pwned')",
    "/proc/PID/root of the server": "import os\nopen(f'/proc/{{os.getppid()}}/root' + {T!r}, 'w').write('pwned')",
    "/proc/self/fd of an O_PATH fd": "import os\nfd = os.open({S!r}, os.O_PATH)\n"
                                     "open(f'/proc/self/fd/{{fd}}/' + {P!r}, 'w')",
    "/proc/self/mem": "open('/proc/self/mem', 'r+b')",
    "/proc/PID/environ of the server": "import os\nprint(open(f'/proc/{{os.getppid()}}/environ').read())",
    "write a readable file": "open({V!r}, 'a').write('pwned')",
    "truncate a readable file": "import os\nos.truncate({V!r}, 0)",
    "O_TRUNC with O_RDONLY": "import os\nos.open({V!r}, os.O_RDONLY | os.O_TRUNC)",
    "chmod a readable file": "import os\nos.chmod({V!r}, 0)",
    "chmod via an fd": "import os\nos.fchmod(os.open({V!r}, os.O_RDONLY), 0)",
    "chattr via ioctl": "import fcntl, os, struct\nfd = os.open({V!r}, os.O_RDONLY)\n"
                        "fcntl.ioctl(fd, 0x40086602, struct.pack('q', 0x40))  # FS_IOC_SETFLAGS, FS_NODUMP_FL",
    "utime a readable file": "import os\nos.utime({V!r}, (0, 0))",
    "unlink a readable file": "import os\nos.unlink({V!r})",
    "read a file outside": "print(open({T!r}).read())",
    "mknod a block device": "import os, stat\nos.mknod('disk', stat.S_IFBLK | 0o600, os.makedev(8, 0))",
    "ctypes syscall(socket)": LIBC + "assert libc.syscall({socket}, 2, 1, 0) >= 0, 'refused'",
    "socket.create_connection": "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
    "UDP sendto": "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp}))",
    "os.fork": "import os\nif os.fork() == 0:\n    open({N!r}, 'w')",
    "fork via ctypes": LIBC + "assert libc.fork() >= 0, 'refused'",
    "clone3 via ctypes": LIBC + "args = (ctypes.c_uint64 * 8)(0, 0, 0, 0, 17, 0, 0, 0)  # a fork, SIGCHLD\n"
                                "assert libc.syscall({clone3}, args, 64) >= 0, 'refused'",
    "subprocess.run": "import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo ESCAPED > ' + {N!r}])",
    "os.posix_spawn": "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', 'echo ESCAPED > ' + {N!r}], {{}})",
    "os.execv": "import os\nos.execv('/bin/sh', ['sh', '-c', 'echo ESCAPED'])",
    "kill another process": "import os\nos.kill({victim}, 9)",
    "renice another process": "import os\nos.setpriority(os.PRIO_PROCESS, {victim}, 19)",
    "renice a process group": "import os\nos.setpriority(os.PRIO_PGRP, {victim}, 19)",
    "ptrace another process": LIBC + "assert libc.ptrace(16, {victim}, 0, 0) >= 0, 'refused'",
    "raise the CPU limit": "import resource\nsoft, hard = resource.getrlimit(resource.RLIMIT_CPU)\n"
                           "resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))",
    "change user (capabilities are gone)": "import os\nos.setresuid(65534, 65534, 65534)",
    "unshare a user namespace": LIBC + "assert libc.unshare(0x10000000) >= 0, 'refused'",
    "System V shared memory": LIBC + "assert libc.shmget(0, 4096, 0o1600) >= 0, 'refused'  # IPC_PRIVATE",
    "io_uring": LIBC + "assert libc.syscall({io_uring_setup}, 8, ctypes.create_string_buffer(120)) >= 0, 'refused'",
}


def _niceness(pid: int) -> tuple[int, int]:
    return os.getpriority(os.PRIO_PROCESS, pid), os.getpriority(os.PRIO_PROCESS, 0)


@pytest.fixture(scope="module")
def world():
    """What the attempts aim at, created once: a process, a TCP and a UDP listener, a file in the stdlib."""
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    for s in (tcp, udp):
        s.setblocking(False)
    readable = Path(STDLIB, "hearth_escape_victim.txt")
    try:
        readable.write_text("original")
    except OSError:
        readable = None  # a system Python's stdlib this user cannot write: those attempts skip
    try:
        yield {"victim": victim, "tcp": tcp, "udp": udp, "V": readable, "nice": _niceness(victim.pid)}
    finally:
        victim.kill()
        victim.wait()
        tcp.close()
        udp.close()
        if readable is not None:
            readable.unlink(missing_ok=True)
        Path(STDLIB, PROBE).unlink(missing_ok=True)


@confined
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("name", ESCAPES)
async def test_escape_fails_and_changes_nothing(name, layer, world, tmp_path, monkeypatch):
    if "{V" in ESCAPES[name] and world["V"] is None:
        pytest.skip("the stdlib folder is not writable by this user, so no test file can be put there")
    monkeypatch.setattr(sandbox, "_CHILD_OPTIONS", LAYERS[layer])
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "target.txt"
    target.write_text("original")
    readable: Path | None = world["V"]
    v_stat = readable.stat() if readable else None
    code = ESCAPES[name].format(
        T=str(target), D=str(outside), N=str(outside / "new.txt"), S=STDLIB, P=PROBE, V=str(readable),
        port=world["tcp"].getsockname()[1], udp=world["udp"].getsockname()[1], victim=world["victim"].pid,
        socket=_nr("socket"), openat=_nr("openat"), clone3=_nr("clone3"), io_uring_setup=_nr("io_uring_setup"))
    code += "\nprint('ESCAPED')"
    try:
        r = await run_python(code, LIMITS)
    finally:
        leaked = Path(STDLIB, PROBE).exists()
        Path(STDLIB, PROBE).unlink(missing_ok=True)
    assert r.stopped == "exit" and r.returncode == 1 and "Traceback" in r.stderr, (r, code)
    assert "ESCAPED" not in r.stdout + r.stderr
    assert "original" not in r.stdout and "PATH=" not in r.stdout  # nothing read from outside
    assert not leaked, "a file appeared in the interpreter's stdlib folder"
    assert target.read_text() == "original" and os.listdir(outside) == ["target.txt"]
    if readable is not None:
        now = readable.stat()
        assert readable.read_text() == "original"
        assert (stat.S_IMODE(now.st_mode), now.st_mtime_ns, now.st_ino) == \
               (stat.S_IMODE(v_stat.st_mode), v_stat.st_mtime_ns, v_stat.st_ino)
    assert world["victim"].poll() is None, "the other process was killed"
    assert _niceness(world["victim"].pid) == world["nice"], "a process was reniced"
    with pytest.raises(BlockingIOError):
        world["tcp"].accept()[0].close()  # no connection ever arrived
    with pytest.raises(BlockingIOError):
        world["udp"].recv(16)


@confined
@pytest.mark.parametrize("layer", ["kernel", "kernel-abi1"])
async def test_ordinary_programs_still_work_under_confinement(layer, monkeypatch):
    """Files in its own folder, threads (allowed: they share the confinement and cannot write outside
    either), asyncio (a socketpair), and the rest of the stdlib."""
    monkeypatch.setattr(sandbox, "_CHILD_OPTIONS", LAYERS[layer])
    code = ("import asyncio, json, math, os, threading, zlib, decimal, sqlite3\n"
            "os.mkdir('d')\nopen('d/a.txt', 'w').write('hello')\nos.rename('d/a.txt', 'd/b.txt')\n"
            "seen = []\n"
            "def work():\n"
            "    try:\n"
            "        open('/tmp/hearth-thread-escape.txt', 'w')\n"
            "        seen.append('escaped')\n"
            "    except OSError:\n"
            "        seen.append('refused')\n"
            "t = threading.Thread(target=work)\nt.start()\nt.join()\n"
            "db = sqlite3.connect('x.db')\ndb.execute('create table t (x)')\n"
            "print(open('d/b.txt').read(), seen[0], asyncio.run(asyncio.sleep(0, 'async')),\n"
            "      math.factorial(10), len(zlib.compress(b'x' * 100)), sorted(os.listdir('.')))")
    r = await run_python(code, LIMITS)
    assert r.ok, r.stderr
    assert r.stdout == "hello refused async 3628800 12 ['d', 'x.db']\n"
    assert not os.path.exists("/tmp/hearth-thread-escape.txt")


def test_syscall_tables_match_the_kernel_headers():
    """The seccomp filter's numbers, checked against this machine's kernel headers where installed."""
    headers = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
               "aarch64": "/usr/include/asm-generic/unistd.h"}
    checked = 0
    for machine, path in headers.items():
        if not os.path.exists(path):
            continue
        text = Path(path).read_text()
        for name, nr in _sandbox_child.SYSCALLS[machine][1].items():
            found = [line.split()[2] for line in text.splitlines()
                     if line.split()[:2] in (["#define", f"__NR_{name}"], ["#define", f"__NR3264_{name}"])
                     and line.split()[2].isdigit()]  # __NR_truncate is __NR3264_truncate there
            if nr is None:
                assert not found, (machine, name)
            elif found:  # older headers lack the newest calls
                assert found == [str(nr)], (machine, name, found)
                checked += 1
    if not checked:
        pytest.skip("no kernel headers here")


@pytest.fixture
def fresh_probe():
    sandbox.sandbox_unavailable_reason.cache_clear()
    yield
    sandbox.sandbox_unavailable_reason.cache_clear()


@pytest.mark.parametrize("landlock, seccomp, says", [
    ((0, 38), 0, "this kernel has no Landlock (it needs Linux 5.13 or newer built with CONFIG_SECURITY_LANDLOCK)"),
    ((0, 95), 0, "Landlock is built into this kernel but not enabled (add landlock to the lsm= boot parameter)"),
    ((0, 1), 0, "Landlock is blocked here, probably by the container's seccomp profile"),
    ((3, 0), 22, "the python sandbox needs seccomp filters (CONFIG_SECCOMP_FILTER): Invalid argument"),
])
async def test_enabling_is_refused_where_the_kernel_cannot_confine(landlock, seccomp, says, fresh_probe,
                                                                   monkeypatch):
    if sys.platform != "linux" or platform.machine() not in _sandbox_child.SYSCALLS:
        pytest.skip("the refusal here names the platform instead")
    monkeypatch.setattr(sandbox, "_landlock_abi", lambda: landlock)
    monkeypatch.setattr(sandbox, "_seccomp_filters", lambda machine: seccomp)
    for enable in (python_sandbox_tool, lambda: default_registry(sandbox=True, plugins=False)):
        with pytest.raises(SandboxUnavailable) as e:
            enable()
        assert says in str(e.value) and "the sandbox stays off on this machine" in str(e.value)
    with pytest.raises(SandboxUnavailable):
        await run_python("print(1)")
    assert "python" not in default_registry(plugins=False)  # off by default, and then nothing is asked


@confined
@pytest.mark.parametrize("missing", ["landlock", "seccomp"])
async def test_a_child_that_cannot_confine_itself_runs_nothing(missing, tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_CHILD_OPTIONS", {"simulate_missing": missing, "audit": False})
    marker = tmp_path / "ran.txt"
    with pytest.raises(SandboxUnavailable, match=f"sandbox: cannot confine the process: {missing}.*; nothing ran"):
        await run_python(f"open({str(marker)!r}, 'w').write('unconfined')", LIMITS)
    assert not marker.exists()
