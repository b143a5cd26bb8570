"""The first code the sandbox process runs; hearth.agents.tools.sandbox passes this file's text as

    python -I -S -B -X utf8 -c <this text> TMPDIR CPU_S MEMORY_BYTES FILE_BYTES

and the program on stdin. It reads the program, sets the resource limits, installs an audit hook
(sys.addaudithook) that refuses network, processes, foreign libraries and files outside TMPDIR
(the stdlib stays readable so imports work), then runs the program with TMPDIR as cwd. If the
program ends with an expression its repr is printed, as in a REPL. Nothing here is imported by hearth.
"""

import sys


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

    tmp = os.path.realpath(sys.argv[1])
    cpu_s, memory, file_bytes = (int(x) for x in sys.argv[2:5])
    source = sys.stdin.read()
    sys.stdin = io.StringIO("")  # the program reads an empty stdin
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # SIGXCPU at the soft limit, SIGKILL after
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.chdir(tmp)
    readable = tuple(os.path.realpath(p) for p in sys.path if p and os.path.exists(p))
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
