"""RAG index: ingest, update, delete, confinement, extraction, chunk spans, index kinds, MMR, concurrency.

    nice -n 10 .venv/bin/python -m pytest tests/agents/test_rag.py -q

Fast: HashingEmbedder or a random-vector embedder, no model. The real MiniLM and chat-model checks are in
test_rag_model.py (slow); the crash-safety checks (SIGKILL mid-ingest) in test_rag_crash.py.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from hearth.agents.embed import HashingEmbedder
from hearth.agents.rag import (DocumentNotFound, EmbedderMismatch, ExtractionError, IndexNotFound, IndexStore,
                               IngestCancelled, RagIndex, chunk_text, choose_kind, extract_text, fallback_spans,
                               html_to_text)
from hearth.agents.rag import storage, vectors
from hearth.agents.types import AgentInputError



class RandomEmbedder:
    """One fixed random unit vector per distinct text (seeded by its hash): fast, and exact-text
    queries find their document, which is all the index-kind tests need."""

    def __init__(self, dimensions: int = 32):
        self.name, self.dimensions = f"random-{dimensions}", dimensions

    def embed(self, texts):
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little")
            v = np.random.default_rng(seed).standard_normal(self.dimensions).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out


def minimal_pdf(lines: list[str]) -> bytes:
    """A valid one-page PDF showing `lines` (ASCII) in Helvetica, with a correct xref table."""
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"]
    for ln in lines:
        esc = ln.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        ops.append(f"({esc}) Tj T*")
    ops.append("ET")
    stream = "\n".join(ops).encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


FACTS = {
    "kettle.md": "# Kettle\n\nDescale the kettle every four weeks with vinegar and water.\n",
    "tea.txt": "Green tea is brewed at eighty degrees Celsius for two minutes.\n",
    "bikes.md": "Bicycle chains need oil every three hundred kilometres, more often in rain.\n",
}


@pytest.fixture
def docs(tmp_path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for name, text in FACTS.items():
        (root / name).write_text(text)
    return root


def open_index(tmp_path, embedder=None, **kw) -> RagIndex:
    return RagIndex.open(tmp_path / "index", embedder or HashingEmbedder(), create=True, **kw)


def test_ingest_query_update_delete(tmp_path, docs):
    index = open_index(tmp_path)
    assert index.version == 0 and index.documents() == []
    rep = index.ingest([docs], allowed_roots=[tmp_path], progress=False)
    assert sorted(rep.added) == ["docs/bikes.md", "docs/kettle.md", "docs/tea.txt"]
    assert rep.version == 1 == index.version and not rep.replaced and not rep.skipped

    hit = index.query("how often should I descale the kettle", top_k=3)[0]
    assert (hit.rank, hit.source) == (1, "docs/kettle.md") and "four weeks" in hit.text
    assert FACTS["kettle.md"][hit.start:hit.end] == hit.text

    # unchanged files: nothing written, version stays
    rep = index.ingest([docs], allowed_roots=[tmp_path], progress=False)
    assert sorted(rep.unchanged) == ["docs/bikes.md", "docs/kettle.md", "docs/tea.txt"]
    assert rep.version == 1 and not rep.added and not rep.replaced
    assert sorted(os.listdir(index.directory / "v000001")) == ["chunks.jsonl", "index.faiss", "meta.json"]

    # a changed file replaces its chunks: the old fact is gone, the new one found
    (docs / "kettle.md").write_text("# Kettle\n\nDescale the kettle every ten days with citric acid.\n")
    rep = index.ingest([docs / "kettle.md"], allowed_roots=[tmp_path], progress=False)
    assert rep.replaced == ["docs/kettle.md"] and rep.version == 2
    texts = [h.text for h in index.query("descale the kettle", top_k=5)]
    assert any("citric acid" in t for t in texts) and not any("four weeks" in t for t in texts)
    by_source = {d.source: d for d in index.documents()}
    assert by_source["docs/kettle.md"].sha256 == hashlib.sha256((docs / "kettle.md").read_bytes()).hexdigest()
    assert by_source["docs/kettle.md"].size == (docs / "kettle.md").stat().st_size

    # delete: chunks gone; an unknown source names itself and removes nothing
    with pytest.raises(DocumentNotFound, match="docs/nope.md"):
        index.delete(["docs/tea.txt", "docs/nope.md"])
    assert index.version == 2
    removed = index.delete(["docs/tea.txt"])
    assert removed == by_source["docs/tea.txt"].chunks >= 1
    assert [d.source for d in index.documents()] == ["docs/bikes.md", "docs/kettle.md"]
    assert all(h.source != "docs/tea.txt" for h in index.query("green tea", top_k=5))

    # persisted: a fresh handle sees the same; old versions are pruned to the newest two
    again = RagIndex.open(index.directory, HashingEmbedder())
    assert again.version == 3 and [d.source for d in again.documents()] == ["docs/bikes.md", "docs/kettle.md"]
    assert sorted(p.name for p in index.directory.glob("v*")) == ["v000002", "v000003"]
    assert (index.directory / "CURRENT").read_text() == "v000003\n"


def test_add_texts_and_input_errors(tmp_path):
    index = open_index(tmp_path)
    rep = index.add_texts([("faq", "Refunds take five working days."), ("empty", "   ")])
    assert rep.added == ["faq"] and rep.skipped == [("empty", "the text is empty")]
    assert index.add_texts([("faq", "Refunds take five working days.")]).unchanged == ["faq"]
    for bad, param in ((lambda: index.query(""), "query"), (lambda: index.query("x", top_k=0), "top_k"),
                       (lambda: index.query("x", mmr=True, mmr_lambda=2), "mmr_lambda"),
                       (lambda: index.add_texts([("a", "x"), ("a", "y")]), "documents"),
                       (lambda: index.add_texts([("bad\nname", "x")]), "documents"),
                       (lambda: index.delete([]), "sources")):
        with pytest.raises(AgentInputError) as e:
            bad()
        assert e.value.param == param
    with pytest.raises(AgentInputError, match="overlap_tokens"):
        RagIndex.open(tmp_path / "other", HashingEmbedder(), create=True, chunk_tokens=20, overlap_tokens=15)
    with pytest.raises(AgentInputError, match="kind"):
        RagIndex.open(tmp_path / "other", HashingEmbedder(), create=True, kind="lsh")


def test_open_errors(tmp_path):
    with pytest.raises(IndexNotFound):
        RagIndex.open(tmp_path / "missing", HashingEmbedder())
    open_index(tmp_path).add_texts([("a", "some text")])
    with pytest.raises(EmbedderMismatch, match=r"hashing-256.*256 dimensions.*hashing-64"):
        RagIndex.open(tmp_path / "index", HashingEmbedder(64))
    # maintenance without an embedder works, embedding without one says why
    bare = RagIndex.open(tmp_path / "index", None)
    assert [d.source for d in bare.documents()] == ["a"]
    with pytest.raises(Exception, match="without an embedder"):
        bare.query("text")


def test_store_names_validation_and_drop(tmp_path):
    made = []
    store = IndexStore(tmp_path / "rag", lambda: made.append(1) or HashingEmbedder())
    assert store.names() == [] and made == []  # the embedder is made lazily
    for bad in ("", ".hidden", "a/b", "../x", "x" * 65, "sp ace"):
        with pytest.raises(AgentInputError) as e:
            store.get(bad, create=True)
        assert e.value.param == "index"
    with pytest.raises(IndexNotFound):
        store.get("notes")
    notes = store.get("notes", create=True)
    store.get("other", create=True)
    assert store.get("notes") is notes and made == [1]  # one embedder, shared; handles cached
    notes.add_texts([("a", "alpha")])
    assert store.names() == ["notes", "other"]
    store.drop("notes")
    assert store.names() == ["other"] and not (tmp_path / "rag" / "notes").exists()
    with pytest.raises(IndexNotFound):
        notes.query("alpha")  # a handle to a dropped index says so
    with pytest.raises(IndexNotFound):
        store.drop("notes")


# ---- confinement and limits -----------------------------------------------------------------------------

def test_traversal_and_symlink_escape(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.md").write_text("inside the root")
    secret = tmp_path / "secret.txt"
    secret.write_text("the password is hunter2")
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    (outside_dir / "x.md").write_text("outside folder")
    (root / "sub" / "link.txt").symlink_to(secret)
    (root / "sub" / "dirlink").symlink_to(outside_dir)
    index = open_index(tmp_path)

    for bad in (root / ".." / "secret.txt", root / "sub" / ".." / ".." / "secret.txt", root / "sub" / "link.txt",
                secret):
        with pytest.raises(AgentInputError, match="outside the allowed roots") as e:
            index.ingest([bad], allowed_roots=[root], progress=False)
        assert e.value.param == "paths"
    assert index.version == 0

    rep = index.ingest([root], allowed_roots=[root], progress=False)
    assert rep.added == ["ok.md"]
    reasons = dict(rep.skipped)
    assert "outside the allowed roots" in reasons[str(root / "sub" / "link.txt")]
    assert "not followed" in reasons[str(root / "sub" / "dirlink")]
    assert all("hunter2" not in h.text for h in index.query("password", top_k=5))
    # a path that leaves and re-enters the root is fine: it resolves inside
    rep = index.ingest([root / "sub" / ".." / "ok.md"], allowed_roots=[root], progress=False)
    assert rep.unchanged == ["ok.md"]
    with pytest.raises(AgentInputError, match="no such file"):
        index.ingest([root / "missing.md"], allowed_roots=[root], progress=False)
    with pytest.raises(AgentInputError) as e:
        index.ingest([root], allowed_roots=[], progress=False)
    assert e.value.param == "allowed_roots"


def test_limits_and_unsupported_types(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "big.txt").write_text("word " * 400)      # 2000 bytes
    (root / "small.md").write_text("small file")
    (root / "image.png").write_bytes(b"\x89PNG....")
    index = open_index(tmp_path)
    with pytest.raises(AgentInputError, match="2000 bytes, more than the limit of 1000"):
        index.ingest([root / "big.txt"], allowed_roots=[root], max_file_bytes=1000, progress=False)
    with pytest.raises(AgentInputError, match=r"unsupported file type '\.png'; supported: \.txt, \.md"):
        index.ingest([root / "image.png"], allowed_roots=[root], progress=False)
    rep = index.ingest([root], allowed_roots=[root], max_file_bytes=1000, progress=False)
    assert rep.added == ["small.md"]
    assert sorted(Path(p).name for p, _ in rep.skipped) == ["big.txt", "image.png"]
    with pytest.raises(AgentInputError, match="more than the limit of 1500 bytes") as e:
        index.ingest([root], allowed_roots=[root], max_total_bytes=1500, progress=False)
    assert e.value.param == "paths"


# ---- extraction ------------------------------------------------------------------------------------------

def test_html_text():
    page = ("<html><head><title>Tea &amp; kettles</title><style>p {color: red}</style>"
            "<script>alert('ignore me')</script></head><body><h1>Green&nbsp;tea</h1><p>Brew at 80&deg;C."
            "</p><ul><li>one</li><li>two</li></ul><noscript>enable js</noscript><p>Done &lt;here&gt;</p>"
            "</body></html>")
    text = html_to_text(page)
    assert text.startswith("Tea & kettles\n")
    assert "Green tea" in text and "Brew at 80°C." in text and "Done <here>" in text
    assert "one\n" in text and "two" in text
    for gone in ("alert", "color", "enable js", "<p>"):
        assert gone not in text


def test_pdf_and_decoding_errors(tmp_path):
    pdf = tmp_path / "manual.pdf"
    pdf.write_bytes(minimal_pdf(["The espresso machine needs descaling every two months.", "Page one ends."]))
    text = extract_text(pdf, pdf.read_bytes())
    assert "espresso machine needs descaling every two months" in text
    index = open_index(tmp_path)
    index.ingest([pdf], allowed_roots=[tmp_path], progress=False)
    assert index.query("espresso descaling")[0].source == "manual.pdf"

    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(ExtractionError, match="broken.pdf"):
        index.ingest([broken], allowed_roots=[tmp_path], progress=False)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café au lait".encode("latin-1"))
    with pytest.raises(ExtractionError, match=r"latin\.txt: not valid UTF-8 at byte 3"):
        index.ingest([latin], allowed_roots=[tmp_path], progress=False)
    # in a folder the same files are skipped with the reason, the rest ingested
    rep = index.ingest([tmp_path], allowed_roots=[tmp_path], progress=False)
    reasons = {Path(p).name: r for p, r in rep.skipped}
    assert "UTF-8" in reasons["latin.txt"] and "PDF" in reasons["broken.pdf"]
    assert rep.unchanged == ["manual.pdf"]
    (tmp_path / "bom.md").write_bytes("\ufeffBOM text".encode("utf-8"))
    (tmp_path / "utf16.txt").write_bytes("UTF-16 words".encode("utf-16"))
    assert extract_text(tmp_path / "bom.md", (tmp_path / "bom.md").read_bytes()) == "BOM text"
    assert extract_text(tmp_path / "utf16.txt", (tmp_path / "utf16.txt").read_bytes()) == "UTF-16 words"


# ---- chunking ---------------------------------------------------------------------------------------------

def test_chunks_overlap_and_prefer_sentence_ends():
    text = " ".join(f"Sentence number {i} is here." for i in range(60))
    chunks = chunk_text(text, fallback_spans, chunk_tokens=40, overlap_tokens=10)
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:]):
        assert text[a.start:a.end] == a.text and a.tokens <= 40
        assert b.start < a.end  # overlap
        assert a.text.endswith(".")  # cut at a sentence end, not mid-sentence
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    assert chunk_text(text, fallback_spans, 40, 0)[1].start >= chunk_text(text, fallback_spans, 40, 0)[0].end


def test_cjk_chunking_spans():
    zh = "今天天气很好。我们一起去公园散步，然后喝一杯绿茶。" * 20 + "最后一句话在这里。"
    chunks = chunk_text(zh, fallback_spans, chunk_tokens=30, overlap_tokens=6)
    assert len(chunks) > 10  # no spaces, but never one giant "word"
    covered = np.zeros(len(zh), dtype=bool)
    for c in chunks:
        assert zh[c.start:c.end] == c.text and c.tokens <= 30 and len(c.text) <= 30
        covered[c.start:c.end] = True
    assert covered.all()
    assert chunks[-1].text.endswith("最后一句话在这里。")
    mixed = "Hello 世界, this is 日本語のテキスト and 한국어 text."
    toks = [mixed[s:e] for s, e in fallback_spans(mixed)]
    assert toks[:4] == ["Hello", "世", "界", ","] and "日" in toks and "한" in toks


def test_index_spans_for_cjk_documents(tmp_path):
    index = open_index(tmp_path, chunk_tokens=16, overlap_tokens=4)
    zh = "绿茶最好用八十度的水冲泡。泡两到三分钟就可以了。时间太长茶会变苦。" * 3
    index.add_texts([("茶.md", zh)])
    hits = index.query("绿茶 水温", top_k=10)
    assert len(hits) == index.documents()[0].chunks > 2
    for h in hits:
        assert zh[h.start:h.end] == h.text


# ---- index kinds and MMR -----------------------------------------------------------------------------------

def test_choose_kind_by_size():
    assert choose_kind(100) == "flat" and choose_kind(vectors.FLAT_MAX) == "flat"
    assert choose_kind(vectors.FLAT_MAX + 1) == "hnsw" and choose_kind(vectors.HNSW_MAX + 1) == "ivf"
    assert choose_kind(100, "hnsw") == "hnsw" and choose_kind(10, "ivf") == "flat"  # too few to train


def test_large_index_uses_hnsw_then_ivf(tmp_path, monkeypatch):
    monkeypatch.setattr(vectors, "FLAT_MAX", 500)
    monkeypatch.setattr(vectors, "HNSW_MAX", 4000)
    emb = RandomEmbedder(32)
    index = open_index(tmp_path, emb, chunk_tokens=32, overlap_tokens=0)
    texts = [f"synthetic document {i} about topic {i * 7919 % 1000}" for i in range(3000)]
    index.add_texts([(f"d{i}", t) for i, t in enumerate(texts[:400])])
    assert index.info()["index_kind"] == "flat"
    index.add_texts([(f"d{i}", t) for i, t in enumerate(texts) if i >= 400])
    assert index.info()["index_kind"] == "hnsw" and index.info()["chunks"] == 3000
    for i in (0, 1234, 2999):
        assert index.query(texts[i], top_k=3)[0].source == f"d{i}"
    more = [f"extra document {i}" for i in range(1200)]
    index.add_texts([(f"e{i}", t) for i, t in enumerate(more)])
    assert index.info()["index_kind"] == "ivf"
    reopened = RagIndex.open(index.directory, emb)
    assert reopened.info()["index_kind"] == "ivf"
    for q, src in ((texts[5], "d5"), (more[77], "e77"), (texts[2500], "d2500")):
        assert reopened.query(q, top_k=3)[0].source == src
        assert reopened.query(q, top_k=3, mmr=True)[0].source == src
    # an explicit kind overrides the size rule from the next commit on
    flat = RagIndex.open(index.directory, emb, kind="flat")
    flat.delete(["e0"])
    assert flat.info()["index_kind"] == "flat" and flat.query(more[9])[0].source == "e9"


def test_mmr_diversifies(tmp_path):
    index = open_index(tmp_path)
    same = "Green tea is brewed at eighty degrees with fresh green tea leaves."
    index.add_texts([("copy1", same), ("copy2", same), ("copy3", same),
                     ("other", "Green tea leaves are picked in spring and brewed briefly."),
                     ("bikes", "Oil the bicycle chain every few hundred kilometres.")])
    plain = index.query("brewed green tea leaves", top_k=3)
    assert {h.source for h in plain} == {"copy1", "copy2", "copy3"}
    diverse = index.query("brewed green tea leaves", top_k=3, mmr=True, mmr_lambda=0.5)
    assert diverse[0].source.startswith("copy") and "other" in [h.source for h in diverse[:2]]
    assert len({h.text for h in diverse}) == 3 and [h.rank for h in diverse] == [1, 2, 3]
    # lambda 1 is pure relevance
    assert {h.source for h in index.query("brewed green tea leaves", top_k=3, mmr=True, mmr_lambda=1.0)} == \
        {"copy1", "copy2", "copy3"}


# ---- concurrency ------------------------------------------------------------------------------------------

def test_readers_see_whole_versions_while_a_writer_commits(tmp_path):
    index = open_index(tmp_path, chunk_tokens=16, overlap_tokens=0)
    written = {0: "round 0 " + "alpha beta gamma " * 20}
    index.add_texts([("doc", written[0])])
    done, seen, errors = threading.Event(), [], []

    def reader():
        other = RagIndex.open(index.directory, HashingEmbedder())  # another handle: reloads from disk
        while not done.is_set():
            for handle in (index, other):
                try:
                    hits = handle.query("alpha beta gamma", top_k=50)
                except Exception as e:  # any failure is the test's failure
                    errors.append(repr(e))
                    return
                rounds = {h.text.split()[1] for h in hits if h.text.startswith("round")}
                seen.append((len(hits), rounds))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for r in range(1, 8):
            written[r] = f"round {r} " + "alpha beta gamma " * (20 + r)
            index.add_texts([("doc", written[r])])
    finally:
        done.set()
        t.join(timeout=60)
    assert not errors and seen
    chunk_counts = {r: len(chunk_text(w, fallback_spans, 16, 0)) for r, w in written.items()}
    for n_hits, rounds in seen:
        # each answer comes from one whole version: its round marker and its chunk count agree
        assert len(rounds) <= 1
        if rounds:
            assert n_hits == chunk_counts[int(rounds.pop())]


def test_a_cancelled_write_commits_nothing_and_releases_the_lock(tmp_path, docs):
    index = open_index(tmp_path, lock_timeout_s=1.0)
    index.add_texts([("a.txt", "Refunds take five days.")])
    version = index.version
    batches = []
    long = " ".join(f"Sentence {i} about the harbour." for i in range(3000))

    def stop_after_two():  # checked between embedding batches
        batches.append(1)
        return len(batches) > 2

    with pytest.raises(IngestCancelled, match="cancelled"):
        index.add_texts([("long.txt", long)], should_stop=stop_after_two)
    assert len(batches) == 3 and index.version == version
    assert [d.source for d in index.documents()] == ["a.txt"]
    with pytest.raises(IngestCancelled):
        index.ingest([docs], allowed_roots=[docs.parent], progress=False, should_stop=lambda: True)
    index.add_texts([("b.txt", "Shipping takes a week.")])  # the lock is free again (1 s wait at most)
    assert index.version == version + 1
