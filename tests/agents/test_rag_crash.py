"""A writer killed (SIGKILL) at any point of an ingest leaves the last good index version loadable.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_rag_crash.py -q

The ingest runs in a subprocess that stops at a chosen point (the hook lives in this test's script, not
in the library): while embedding, after part of the new version is written, or just before it is
published. The parent kills it there and opens the index.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from hearth.agents.embed import HashingEmbedder
from hearth.agents.rag import IndexBusy, RagIndex

SCRIPT = textwrap.dedent("""
    import sys, time
    from hearth.agents.embed import HashingEmbedder
    from hearth.agents.rag import IndexBusy, RagIndex, storage

    directory, phase = sys.argv[1], sys.argv[2]

    def stop_here():
        print("READY", flush=True)
        time.sleep(600)  # the parent kills us during this

    class SlowEmbedder(HashingEmbedder):
        def embed(self, texts):
            if phase == "embed":
                stop_here()
            return super().embed(texts)

    if phase == "write":  # the chunks file of the new version is on disk, the meta not yet
        real_write = storage.write_durable
        def write_durable(path, data):
            real_write(path, data)
            if path.name == storage.CHUNKS_FILE:
                stop_here()
        storage.write_durable = write_durable
    if phase == "publish":  # the new version folder is complete, CURRENT not yet replaced
        real_publish = storage.publish
        def publish(directory, name):
            stop_here()
        storage.publish = publish

    index = RagIndex.open(directory, SlowEmbedder())
    index.add_texts([("volcano.md", "Volcanoes erupt molten rock called lava. " * 30),
                     ("kettle.md", "Descale the kettle every ten days with citric acid.")])
    print("FINISHED", flush=True)
""")


def wait_for_line(proc: subprocess.Popen, want: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        if want.encode() in buf:
            return
    proc.kill()
    raise AssertionError(f"the ingest subprocess never printed {want}: {buf!r} {proc.stderr.read()!r}")


@pytest.mark.parametrize("phase", ["embed", "write", "publish"])
def test_sigkill_mid_ingest_keeps_last_good_version(tmp_path, phase):
    directory = tmp_path / "index"
    index = RagIndex.open(directory, HashingEmbedder(), create=True)
    index.add_texts([("kettle.md", "Descale the kettle every four weeks with vinegar."),
                     ("tea.md", "Green tea is brewed at eighty degrees.")])
    assert index.version == 1

    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(directory), phase], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "READY", timeout_s=120)
        # while it holds the writer lock, another writer waits, then gives up naming the holder
        with pytest.raises(IndexBusy, match=f"process {proc.pid}"):
            RagIndex.open(directory, HashingEmbedder(), lock_timeout_s=0.2).add_texts([("x.md", "x")])
        assert index.query("kettle")[0].source == "kettle.md"  # readers are never blocked
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    leftovers = sorted(p.name for p in directory.iterdir())
    if phase == "write":
        assert any(n.startswith(".tmp-v000002") for n in leftovers), leftovers
    if phase == "publish":
        assert "v000002" in leftovers, leftovers

    # the last good version loads and answers; the dead writer's leftovers are cleaned on open
    again = RagIndex.open(directory, HashingEmbedder())
    assert again.version == 1
    assert [d.source for d in again.documents()] == ["kettle.md", "tea.md"]
    hit = again.query("descale the kettle")[0]
    assert hit.source == "kettle.md" and "four weeks" in hit.text
    assert sorted(p.name for p in directory.iterdir()) == ["CURRENT", "LOCK", "v000000", "v000001"]
    # the lock died with the writer: the next ingest commits normally
    rep = again.add_texts([("volcano.md", "Volcanoes erupt lava.")])
    assert rep.version == 2 and again.query("volcano lava")[0].source == "volcano.md"
