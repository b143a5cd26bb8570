"""`hearth edge` as a user meets it: start-to-first-token and peak memory of the real program.

    hearth bench edge --json bench/edge.json              # 3 runs with the bundled model (~30 s on 2 cores)
    python bench/edge.py --runs 5 --threads 2 --model path/to/model.gguf

Each run starts `python -m hearth.clients.cli edge` on a pseudo-terminal with a fresh history file,
waits for its prompt, types one question and reads the streamed answer like a terminal would:

- start to first token: process start -> the first character of the first answer on the terminal
  (the issue's target: <= 2 s on the 2-core CPU); the program's start-up and the answer's own
  first-token latency (from its `[N tokens, R tok/s, first token T s]` line) are shown apart;
- peak RSS: VmHWM of the process from /proc (the target: <= 400 MB with the default model).

Medians over the runs are printed beside the targets; every run goes to --json. `Terminal`, the
pseudo-terminal driver used here, also drives the program in tests/clients/test_edge.py.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import pty
import re
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

from hearth.clients.cmd_bench import output_problem, write_json

TARGETS = {"start_to_first_token_s": 2.0, "peak_rss_mb": 400.0}
STATS_LINE = re.compile(r"\[(?:[a-z ]+: )?(\d+) tokens(?:, ([\d.]+) tok/s, first token ([\d.]+) s)?\]")
_ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")


def _make_controlling_tty() -> None:
    # runs in the child after setsid(): the pty on fd 0 becomes its terminal, so \x03 sends SIGINT
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """A program on a pseudo-terminal, driven like a user at a keyboard (a small pexpect).

    Output is kept as text with escape sequences and carriage returns removed; `expect` searches
    it from where the last match ended."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd: str | None = None,
                 cols: int = 200, rows: int = 50):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.started = time.monotonic()
        try:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd,
                                         start_new_session=True, preexec_fn=_make_controlling_tty)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self.fd = master
        self._raw = bytearray()
        self.text = ""
        self.pos = 0
        self.eof = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, timeout: float) -> bool:
        """Wait up to `timeout` for output; False when none came (or the program's side closed)."""
        if self.eof:
            return False
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: every process on the terminal is gone
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._raw += chunk
        self.text = _ANSI.sub(b"", bytes(self._raw)).decode("utf-8", errors="replace")
        return True

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait until `pattern` (a regex) appears after the last match; TimeoutError / EOFError show the output."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                tail = self.text[-3000:]
                err = EOFError if self.eof else TimeoutError
                raise err(f"{pattern!r} not seen after {timeout:.0f} s; output so far:\n{tail}")
            self._read(left)

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode("utf-8"))

    def sendline(self, text: str) -> None:
        self.send(text + "\r")  # Enter on a terminal

    def interrupt(self) -> None:
        self.send("\x03")  # Ctrl-C: the terminal sends SIGINT to the program

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 30.0) -> int:
        """Read everything until the program exits; its exit code."""
        deadline = time.monotonic() + timeout
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline - time.monotonic())
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Terminal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def edge_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "hearth.clients.cli", "edge", *args]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set size) of a live process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def one_run(args: argparse.Namespace, folder: Path) -> dict:
    argv = ["--history", str(folder / "history.json"), "--new", "--temperature", "0",
            "--max-tokens", str(args.max_tokens)]
    if args.model:
        argv.insert(0, args.model)
    if args.threads:
        argv += ["--threads", str(args.threads)]
    with Terminal(edge_argv(*argv)) as term:
        term.expect(r"you> ", timeout=120)
        ready = time.monotonic()
        term.sendline(args.question)
        term.expect(r"(?s)assistant> .", timeout=120)
        first = time.monotonic()
        m = term.expect(STATS_LINE.pattern, timeout=300)
        rss = peak_rss_mb(term.pid)
        term.sendline("/quit")
        rc = term.wait(60)
        if rc != 0:
            raise RuntimeError(f"hearth edge exited with {rc}:\n{term.text[-2000:]}")
    return {"start_to_first_token_s": first - term.started, "start_to_prompt_s": ready - term.started,
            "first_token_in_app_s": float(m.group(3)) if m.group(3) else None,
            "decode_tok_s": float(m.group(2)) if m.group(2) else None, "tokens": int(m.group(1)),
            "peak_rss_mb": rss}


def summarize(runs: list[dict]) -> dict:
    keys = [k for k in runs[0] if isinstance(runs[0][k], (int, float))]
    return {k: statistics.median(r[k] for r in runs if r[k] is not None) for k in keys}


def format_table(median: dict, n: int) -> str:
    rows = [("start to first token", f"{median['start_to_first_token_s']:.2f} s",
             f"<= {TARGETS['start_to_first_token_s']:.0f} s",
             median["start_to_first_token_s"] <= TARGETS["start_to_first_token_s"]),
            ("  start to prompt", f"{median['start_to_prompt_s']:.2f} s", "", None),
            ("  first token of the answer", f"{median['first_token_in_app_s']:.2f} s", "", None),
            ("peak RSS", f"{median['peak_rss_mb']:.0f} MB", f"<= {TARGETS['peak_rss_mb']:.0f} MB",
             median["peak_rss_mb"] <= TARGETS["peak_rss_mb"]),
            ("decode speed", f"{median['decode_tok_s']:.1f} tok/s", "", None)]
    lines = [f"hearth edge, median of {n} runs", f"{'':30} {'measured':>12} {'target':>10}"]
    for name, value, target, ok in rows:
        verdict = "" if ok is None else ("pass" if ok else "MISS")
        lines.append(f"{name:30} {value:>12} {target:>10}  {verdict}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="PATH", default=None, help="write every run and the medians to this file")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--model", default=None, help="GGUF file or registered name (default: the bundled model)")
    p.add_argument("--threads", type=int, default=None, help="passed to `hearth edge --threads`")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--question", default="What is the capital of France?")


def run(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.max_tokens < 1:
        print("hearth: error: --runs and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    problem = output_problem(args.json)
    if problem:
        print(f"hearth: error: {problem}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="hearth-bench-edge-") as tmp:
        for i in range(args.runs):
            folder = Path(tmp) / f"run{i}"
            folder.mkdir()
            runs.append(one_run(args, folder))
            print(f"run {i + 1}/{args.runs}: first token {runs[-1]['start_to_first_token_s']:.2f} s after start, "
                  f"peak RSS {runs[-1]['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    median = summarize(runs)
    print(format_table(median, len(runs)))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result = {"median": median, "runs": runs, "targets": TARGETS,
              "pass": {k: median[k] <= v for k, v in TARGETS.items()},
              "settings": {"model": args.model or "default", "threads": args.threads, "max_tokens": args.max_tokens,
                           "question": args.question},
              "machine": {"cpus": cpus, "machine": platform.machine(), "python": platform.python_version(),
                          "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if args.json:
        write_json(args.json, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="hearth bench edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
