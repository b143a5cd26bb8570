"""Temps beside an output name their owner; the next writer removes those of dead processes only.

    python -m pytest tests/runtime/test_fileio.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.runtime import fileio
from hearth.runtime.fileio import TMP_MARK, atomic_write_text, make_temp, remove_stale_temps, staged

# A writer that makes its temp folder the way every stage does, says where, then works "forever".
_WRITER = ("import sys, time\n"
           "from hearth.runtime.fileio import make_temp\n"
           "print(make_temp(sys.argv[1], is_dir=True), flush=True)\n"
           "time.sleep(120)\n")


def _writer(target: Path) -> tuple[subprocess.Popen, Path]:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    tmp = Path(p.stdout.readline().strip())
    assert tmp.is_dir() and tmp.name.startswith(f".{target.name}{TMP_MARK}pid{p.pid}-"), tmp
    (tmp / "weights.bin").write_bytes(b"\0" * 1024)
    return p, tmp


def _temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TMP_MARK in p.name)


def test_a_killed_writers_temp_is_removed_a_live_writers_is_kept(tmp_path):
    target = tmp_path / "model.gguf"
    dead, dead_tmp = _writer(target)
    live, live_tmp = _writer(target)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        unmarked = tmp_path / f".{target.name}{TMP_MARK}abc123"  # an older hearth's temp: owner unknown
        unmarked.mkdir()
        other = tmp_path / ".other.gguf.tmp-pid1-t1-h00000000-x"  # another target's: not ours to judge
        other.mkdir()

        atomic_write_text(target, "new")  # the next run of the same output

        assert target.read_text() == "new"
        assert not dead_tmp.exists()
        assert live_tmp.is_dir() and (live_tmp / "weights.bin").is_file()
        assert unmarked.is_dir() and other.is_dir()
    finally:
        live.kill()
        live.wait(timeout=30)
    assert remove_stale_temps(target) == [live_tmp]  # once its owner is gone, it goes too


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="start times are read from /proc")
def test_a_reused_pid_does_not_keep_a_stale_temp(tmp_path):
    target = tmp_path / "out"
    mark = fileio.owner_mark()
    start = int(mark.split("-t")[1].split("-")[0])
    # this process's pid, but a start time it never had: the pid was reused after a crash
    stale = tmp_path / f".out{TMP_MARK}pid{os.getpid()}-t{start + 1}-h{fileio._host()}-xyz"
    stale.mkdir()
    mine = make_temp(target, is_dir=True)
    assert not stale.exists() and mine.is_dir()
    assert remove_stale_temps(target) == []  # this process's own temp is live


def test_a_folder_set_aside_by_a_dead_writer_is_put_back(tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: the old one is the only copy."""
    target = tmp_path / "ckpt"
    dead, _tmp = _writer(target)
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=30)
    aside = tmp_path / f".ckpt{TMP_MARK}old-" f"{_tmp.name.split(TMP_MARK)[1]}"
    _tmp.rename(aside)  # what commit_dir's first rename makes, owned by the dead writer
    remove_stale_temps(target)
    assert (target / "weights.bin").is_file() and _temps(tmp_path) == []


def test_staged_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out"
    with staged(target, is_dir=True) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with staged(target, is_dir=True) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("killed halfway")
    assert (target / "a").read_text() == "1" and _temps(tmp_path) == []
    with staged(target, is_dir=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and _temps(tmp_path) == []
    assert (target / "b").stat().st_mode & 0o777 == 0o644
