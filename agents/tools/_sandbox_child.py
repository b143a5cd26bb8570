"""The first code the sandbox process runs; hearth.agents.tools.sandbox passes this file's text as

    python -I -S -B -X utf8 -c <this text> CONFIG

and the program on stdin. CONFIG, a dict literal, holds tmp, cpu_s, memory, file_bytes, audit (install
the audit hook, default True) and two switches for tests: abi_max (use no newer Landlock ABI than this,
as an older kernel would) and simulate_missing ("landlock" or "seccomp": fail as a kernel without it).

It reads the program, sets the resource limits, then confines itself with the kernel (see confine(); the
reasons are in sandbox.py's docstring) and only then runs the program, with the temporary directory as cwd.
If any step of the confinement fails it prints "sandbox: cannot confine the process: ..." and exits with
status 86 without running anything. The audit hook (sys.addaudithook) on top only turns the common
mistakes into clear messages; it is not the boundary. If the program ends with an expression its repr
is printed, as in a REPL. sandbox.py imports this module only for its tables; importing runs nothing.
"""

import sys

CONFINE_FAILED = 86  # sandbox.py knows this status too

# Landlock (include/uapi/linux/landlock.h): filesystem rights by the ABI version that introduced them
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_REMOVE_DIR, FS_REMOVE_FILE, FS_MAKE_CHAR, FS_MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
FS_MAKE_REG, FS_MAKE_SOCK, FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1, 5: (1 << 16) - 1}
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # those a file rule may hold
READ = FS_READ_FILE | FS_READ_DIR
# the temporary directory: everything but running programs and making device nodes or sockets
TMP_RIGHTS = (READ | FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_FIFO
              | FS_MAKE_SYM | FS_REFER | FS_TRUNCATE)
# read-only: the interpreter's standard library (sys.path) and the shared libraries its extension modules load
READ_ONLY = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/share/zoneinfo", "/etc/localtime", "/etc/ld.so.cache",
             "/dev/urandom", "/dev/random", "/dev/zero")

# seccomp: syscall numbers (x86_64's unistd_64.h, aarch64's asm-generic/unistd.h); None: not on that arch
_COMMON = dict(  # numbers from 424 on are the same on every architecture
    pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, open_tree=428,
    move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433, pidfd_open=434, clone3=435, openat2=437,
    pidfd_getfd=438, mount_setattr=442, fchmodat2=452, setxattrat=463, removexattrat=466, open_tree_attr=467,
    file_setattr=469)
SYSCALLS = {  # name: (AUDIT_ARCH value, name -> number)
    "x86_64": (0xC000003E, dict(
        _COMMON, socket=41, socketpair=53, fork=57, vfork=58, clone=56, execve=59, execveat=322, ptrace=101,
        process_vm_readv=310, process_vm_writev=311, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
        rt_tgsigqueueinfo=297, setrlimit=160, prlimit64=302, unshare=272, setns=308, mount=165, umount2=166,
        pivot_root=155, chroot=161, open_by_handle_at=304, name_to_handle_at=303, bpf=321, perf_event_open=298,
        userfaultfd=323, keyctl=250, add_key=248, request_key=249, kexec_load=246, kexec_file_load=320,
        init_module=175, finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, iopl=172,
        ioperm=173, acct=163, quotactl=179, syslog=103, settimeofday=164, clock_settime=227, clock_adjtime=305,
        adjtimex=159, sethostname=170, setdomainname=171, fanotify_init=300, chmod=90, fchmod=91,
        fchmodat=268, chown=92, fchown=93, lchown=94, fchownat=260, utime=132, utimes=235, futimesat=261,
        utimensat=280, setxattr=188, lsetxattr=189, fsetxattr=190, removexattr=197, lremovexattr=198,
        fremovexattr=199, open=2, openat=257, truncate=76, seccomp=317, ioctl=16, setpriority=141,
        sched_setparam=142, sched_setscheduler=144, sched_setaffinity=203, sched_setattr=314, ioprio_set=251,
        shmget=29, shmat=30, shmctl=31, shmdt=67, semget=64, semop=65, semctl=66, semtimedop=220, msgget=68,
        msgsnd=69, msgrcv=70, msgctl=71, mq_open=240, mq_unlink=241, mq_timedsend=242, mq_timedreceive=243,
        mq_notify=244, mq_getsetattr=245)),
    "aarch64": (0xC00000B7, dict(
        _COMMON, socket=198, socketpair=199, fork=None, vfork=None, clone=220, execve=221, execveat=281,
        ptrace=117, process_vm_readv=270, process_vm_writev=271, kill=129, tkill=130, tgkill=131,
        rt_sigqueueinfo=138, rt_tgsigqueueinfo=240, setrlimit=164, prlimit64=261, unshare=97, setns=268,
        mount=40, umount2=39, pivot_root=41, chroot=51, open_by_handle_at=265, name_to_handle_at=264, bpf=280,
        perf_event_open=241, userfaultfd=282, keyctl=219, add_key=217, request_key=218, kexec_load=104,
        kexec_file_load=294, init_module=105, finit_module=273, delete_module=106, reboot=142, swapon=224,
        swapoff=225, iopl=None, ioperm=None, acct=89, quotactl=60, syslog=116, settimeofday=170,
        clock_settime=112, clock_adjtime=266, adjtimex=171, sethostname=161, setdomainname=162,
        fanotify_init=262, chmod=None, fchmod=52, fchmodat=53, chown=None, fchown=55, lchown=None,
        fchownat=54, utime=None, utimes=None, futimesat=None, utimensat=88, setxattr=5, lsetxattr=6,
        fsetxattr=7, removexattr=14, lremovexattr=15, fremovexattr=16, open=None, openat=56, truncate=45,
        seccomp=277, ioctl=29, setpriority=140, sched_setparam=118, sched_setscheduler=119,
        sched_setaffinity=122, sched_setattr=274, ioprio_set=30, shmget=194, shmat=196, shmctl=195, shmdt=197,
        semget=190, semop=193, semctl=191, semtimedop=192, msgget=186, msgsnd=189, msgrcv=188, msgctl=187,
        mq_open=180, mq_unlink=181, mq_timedsend=182, mq_timedreceive=183, mq_notify=184, mq_getsetattr=185)),
}
# refused outright with EPERM: new programs, other processes, kernel state, what could undo the rest,
# changes to file metadata (modes, owners, times, xattrs) which Landlock does not cover, and System V and
# POSIX IPC objects, which outlive the process and may belong to others
DENIED = ("socket", "fork", "vfork", "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
          "tkill", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "setrlimit", "unshare", "setns", "mount",
          "umount2", "pivot_root", "chroot", "open_tree", "open_tree_attr", "move_mount", "fsopen", "fsconfig",
          "fsmount", "fspick", "mount_setattr", "open_by_handle_at", "name_to_handle_at", "bpf", "perf_event_open",
          "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register", "keyctl", "add_key",
          "request_key", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
          "swapon", "swapoff", "iopl", "ioperm", "acct", "quotactl", "syslog", "settimeofday", "clock_settime",
          "clock_adjtime", "adjtimex", "sethostname", "setdomainname", "fanotify_init", "chmod", "fchmod",
          "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat", "utime", "utimes", "futimesat",
          "utimensat", "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
          "setxattrat", "removexattrat", "file_setattr", "ioprio_set", "shmget", "shmat", "shmctl", "shmdt",
          "semget", "semop", "semctl", "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink",
          "mq_timedsend", "mq_timedreceive", "mq_notify", "mq_getsetattr")
# ioctl requests that change a file's flags or attributes on a descriptor opened only for reading
# (FS_IOC_SETFLAGS, FS_IOC32_SETFLAGS, FS_IOC_SETVERSION, FS_IOC32_SETVERSION, FS_IOC_FSSETXATTR)
DENIED_IOCTLS = (0x40086602, 0x40046602, 0x40087602, 0x40047602, 0x401C5820)
CLONE_THREAD, AF_UNIX, O_TRUNC, O_ACCMODE = 0x10000, 1, 0o1000, 3
EPERM, ENOSYS = 1, 38
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
LD_ABS_W, JEQ, JGE, JSET, AND, RET = 0x20, 0x15, 0x35, 0x45, 0x54, 0x06  # classic BPF opcodes


def seccomp_program(machine, pid, landlock_abi):
    """The seccomp filter as (code, jt, jf, k) tuples. Threads may be made (clone with CLONE_THREAD);
    clone3 answers ENOSYS so that libc falls back to clone, whose flags a filter can read. Signals reach
    only this process. Below Landlock ABI 3 (no truncate right), truncating by path is refused here."""
    # the program: check the architecture, then one comparison per syscall number; the syscalls allowed
    # only with some arguments jump to a block of argument checks placed after the final "allow"
    arch, nr = SYSCALLS[machine]
    prog, blocks = [], []

    def arg(i, high=False):  # seccomp_data: nr, arch, ip, then six 64-bit arguments (little-endian)
        return (LD_ABS_W, 0, 0, 16 + 8 * i + (4 if high else 0))

    def only_if(name, *checks):  # allowed when every check passes; a check: (kind, load instruction, value)
        if nr[name] is not None:
            label = f"if_{name}"
            prog.append((JEQ, label, 0, nr[name]))
            blocks.append((label, list(checks)))

    prog += [(LD_ABS_W, 0, 0, 4), (JEQ, 0, "kill", arch), (LD_ABS_W, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((JGE, "eperm", 0, 0x40000000))  # the x32 ABI's numbers
    for name in DENIED:
        if nr[name] is not None:
            prog.append((JEQ, "eperm", 0, nr[name]))
    prog.append((JEQ, "enosys", 0, nr["clone3"]))
    only_if("clone", ("set", arg(0), CLONE_THREAD))
    only_if("socketpair", ("eq", arg(0), AF_UNIX))
    for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
        only_if(name, ("eq", arg(0), pid))
    for name in ("kill", "sched_setparam", "sched_setscheduler", "sched_setaffinity", "sched_setattr"):
        only_if(name, ("pid", arg(0), pid))
    only_if("setpriority", ("eq", arg(0), 0), ("pid", arg(1), pid))  # PRIO_PROCESS, never a group or user
    only_if("prlimit64", ("eq", arg(2), 0), ("eq", arg(2, True), 0))  # reading a limit, never setting one
    only_if("ioctl", *(("ne", arg(1), request) for request in DENIED_IOCTLS))
    if landlock_abi < 3:
        prog.append((JEQ, "eperm", 0, nr["truncate"]))
        prog.append((JEQ, "enosys", 0, nr["openat2"]))
        only_if("open", ("notrunc", arg(1), 0))
        only_if("openat", ("notrunc", arg(2), 0))
    prog.append((RET, 0, 0, RET_ALLOW))
    labels = {}
    for label, checks in blocks:
        labels[label] = len(prog)
        for kind, load, value in checks:
            prog.append(load)
            if kind == "set":
                prog.append((JSET, "allow", "eperm", value))
            elif kind == "pid":  # this process, or 0 (for kill: this process group, which is this process)
                prog += [(JEQ, 1, 0, value), (JEQ, 0, "eperm", 0)]
            elif kind == "notrunc":  # O_TRUNC with O_RDONLY truncates too, without asking for a write
                prog += [(JSET, 0, "allow", O_TRUNC), (AND, 0, 0, O_ACCMODE), (JEQ, "eperm", "allow", 0)]
            elif kind == "ne":
                prog.append((JEQ, "eperm", 0, value))
            else:
                prog.append((JEQ, 0, "eperm", value))
        prog.append((RET, 0, 0, RET_ALLOW))
    for label, k in (("allow", RET_ALLOW), ("eperm", RET_ERRNO | EPERM), ("enosys", RET_ERRNO | ENOSYS),
                     ("kill", RET_KILL_PROCESS)):
        labels[label] = len(prog)
        prog.append((RET, 0, 0, k))
    out = []
    for i, (code, jt, jf, k) in enumerate(prog):  # labels become forward offsets from the next instruction
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        if not (0 <= jt < 256 and 0 <= jf < 256):
            raise ValueError("seccomp program: jump out of range")
        out.append((code, jt, jf, k))
    return out


def confine(tmp, read_only, abi_max=None, simulate_missing=None):
    """Make this process unable to write outside `tmp`, to reach the network, to start processes, to
    signal or inspect others, or to undo any of that, whatever code runs in it next. Raises OSError."""
    import ctypes
    import os
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def check(result, what):
        if result < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")
        return result

    def syscall(*args):  # every argument a full register: variadic ints would leave the upper half unset
        return libc.syscall(*(ctypes.c_long(a) if isinstance(a, int) else a for a in args))

    def prctl(*args):
        return libc.prctl(*(ctypes.c_ulong(a) if isinstance(a, int) else a for a in args))

    machine = os.uname().machine
    if machine not in SYSCALLS:
        raise OSError(0, f"no seccomp syscall table for {machine}")
    # 1. capabilities: a root sandbox keeps none (no raw sockets, devices, rlimit raising, DAC bypass)
    for cap in range(64):
        if prctl(24, cap, 0, 0, 0) < 0 and ctypes.get_errno() == 22:  # PR_CAPBSET_DROP; EINVAL: past the last
            break
    prctl(47, 4, 0, 0, 0)  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    check(prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # needed by both; nothing can gain privileges
    # 2. Landlock: the filesystem, checked on every path however it is reached (dir fds, links, /proc)
    if simulate_missing == "landlock":
        raise OSError(38, "landlock_create_ruleset: Function not implemented (simulated)")
    abi = check(syscall(444, None, 0, 1), "landlock_create_ruleset")  # LANDLOCK_CREATE_RULESET_VERSION
    abi = min(abi, abi_max or abi)
    fs = FS_BY_ABI.get(abi, FS_BY_ABI[5])
    attr = (ctypes.c_uint64 * 3)(fs, NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0,
                                 SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0)
    ruleset = check(syscall(444, attr, 8 * (1 if abi < 4 else 2 if abi < 6 else 3), 0), "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    def allow(path, rights):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # not on this system
        try:
            if not os.path.isdir(path):
                rights &= FILE_RIGHTS
            check(syscall(445, ruleset, 1, ctypes.byref(PathBeneath(rights & fs, fd)), 0), f"landlock_add_rule {path}")
        finally:
            os.close(fd)

    for path in read_only:
        allow(path, READ)
    allow("/dev/null", FS_READ_FILE | FS_WRITE_FILE)
    allow(tmp, TMP_RIGHTS)
    # 3. seccomp: no sockets, processes, exec, ptrace, signals to others, mounts, rlimit changes
    if simulate_missing == "seccomp":
        raise OSError(22, "seccomp: Invalid argument (simulated)")
    prog = seccomp_program(machine, os.getpid(), abi)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *ins) for ins in prog))
    fprog = (ctypes.c_uint64 * 2)(len(prog), ctypes.addressof(filters))  # sock_fprog: len (padded), filter
    check(syscall(446, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    check(prctl(22, 2, fprog, 0, 0), "seccomp")  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER


def _make_hook(tmp, readable):
    # everything the hook needs is bound here, immutable; the hook object itself is kept in no variable
    import os

    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    writable = (tmp,)
    readable = (tmp,) + tuple(readable)
    devices = ("/dev/null", "/dev/urandom", "/dev/random")
    deny_imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "pwd", "grp", "spwd", "gc", "_testcapi",
                              "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels", "subprocess",
                              "multiprocessing", "_multiprocessing", "pty", "_tracemalloc", "faulthandler"))
    deny_events = frozenset(("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                             "os.forkpty", "os.kill", "os.killpg", "os.startfile", "pty.spawn", "resource.setrlimit",
                             "resource.prlimit", "sys.settrace",
                             "sys.setprofile", "sys.addaudithook", "sys.unraisablehook", "webbrowser.open",
                             "ftplib.connect", "imaplib.open", "nntplib.connect", "poplib.connect", "smtplib.connect",
                             "telnetlib.Telnet.open", "http.client.connect", "urllib.Request"))
    path_events = {"os.remove": 1, "os.rename": 2, "os.mkdir": 1, "os.rmdir": 1, "os.chmod": 1, "os.chown": 1,
                   "os.link": 2, "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "os.chflags": 1,
                   "os.lchflags": 1, "os.setxattr": 1, "os.removexattr": 1, "shutil.copyfile": 2,
                   "shutil.copytree": 2, "shutil.move": 2, "shutil.rmtree": 1, "shutil.copymode": 2,
                   "shutil.copystat": 2, "shutil.chown": 1, "os.mkfifo": 1, "os.mknod": 1}
    list_events = frozenset(("os.listdir", "os.scandir", "os.chdir", "os.listxattr", "os.getxattr"))
    frozen_attrs = frozenset(("__code__", "__defaults__", "__kwdefaults__", "__globals__", "__closure__"))

    def inside(path, roots):
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            p = realpath(fsdecode("." if path is None or path == "" else path))
        except (TypeError, ValueError, OSError):
            return False
        return any(p == r or p.startswith(r + sep) for r in roots)

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or \
                      (mode is None and isinstance(flags, int) and bool(flags & write_flags))
            if writing and not inside(path, writable):
                refuse(f"writing {path!r} (only files in the working directory)")
            if not writing and not inside(path, readable) and path not in devices:
                refuse(f"reading {path!r} (only files in the working directory)")
        elif event == "import":
            name = str(args[0])
            if name.split(".")[0] in deny_imports:
                refuse(f"importing {name!r}")
        elif event.startswith("socket."):
            if not (event == "socket.__new__" and len(args) > 1 and args[1] == 1):  # AF_UNIX objects only
                refuse("network access")
        elif event.startswith(("ctypes.", "_winapi.", "winreg.", "msvcrt.")):
            refuse(f"{event}")
        elif event in deny_events or event.startswith("os.exec") or event.startswith("os.spawn"):
            refuse(event)
        elif event in path_events:
            for p in tuple(args)[: path_events[event]]:
                if not inside(p, writable):
                    refuse(f"{event} on {p!r} (only files in the working directory)")
        elif event in list_events:
            if args and not inside(args[0], readable):
                refuse(f"{event} on {args[0]!r} (only the working directory)")
        elif event == "object.__setattr__":
            if len(args) > 1 and args[1] in frozen_attrs:
                refuse(f"setting {args[1]}")

    return hook


def _main():
    import ast
    import builtins
    import io
    import os
    import resource
    import traceback

    cfg = ast.literal_eval(sys.argv[1])
    tmp = os.path.realpath(cfg["tmp"])
    source = sys.stdin.read()
    sys.stdin = io.StringIO("")  # the program reads an empty stdin
    resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))  # SIGXCPU at the soft limit
    resource.setrlimit(resource.RLIMIT_AS, (cfg["memory"], cfg["memory"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir(tmp)
    readable = tuple(os.path.realpath(p) for p in sys.path if p and os.path.exists(p))
    # the installation's own lib folder: a shared libpython and the libraries it bundles (pyenv, conda)
    libs = tuple({os.path.join(prefix, "lib") for prefix in (sys.base_prefix, sys.base_exec_prefix)})
    try:
        confine(tmp, readable + libs + READ_ONLY, cfg.get("abi_max"), cfg.get("simulate_missing"))
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot confine the process: {e.strerror or e}\n")
        sys.stderr.flush()
        os._exit(CONFINE_FAILED)
    try:
        tree = ast.parse(source, "<sandbox>", "exec")
    except SyntaxError:
        traceback.print_exc(limit=0)
        sys.exit(1)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), "<sandbox>", "eval")
    body = compile(tree, "<sandbox>", "exec")
    for name in ("gc", "ctypes", "_ctypes", "_posixsubprocess", "subprocess"):
        sys.modules.pop(name, None)
    if cfg.get("audit", True):
        sys.addaudithook(_make_hook(tmp, readable))
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        # this process is the sandbox: running the program is its whole purpose
        exec(body, namespace)
        if last is not None:
            value = eval(last, namespace)
            if value is not None:
                print(repr(value))
    except SystemExit:
        raise
    except BaseException as e:  # show the program's frames and the stdlib's, not this file's (<string>)
        report = traceback.TracebackException(type(e), e, e.__traceback__)
        report.stack = traceback.StackSummary.from_list([f for f in report.stack if f.filename != "<string>"])
        sys.stdout.flush()
        sys.stderr.write("".join(report.format()))
        sys.exit(1)


if __name__ == "__main__":
    _main()
