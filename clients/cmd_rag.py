"""`hearth rag`: build and search retrieval indexes (hearth.agents.rag).

    hearth rag ingest docs/ notes.md --index notes            # files and folders under the current directory
    hearth rag ingest /data/manuals --index notes --allow-root /data --kind hnsw
    hearth rag query "how do I descale the kettle?" --index notes -k 4 [--mmr] [--json]
    hearth rag query "..." --index notes --url http://127.0.0.1:8000 [--api-key K]   # a running server's index
    hearth rag list                                           # every index: version, documents, chunks
    hearth rag list --index notes                             # the documents of one index
    hearth rag delete docs/old.md --index notes
    hearth rag delete --index notes --drop                    # the whole index

Indexes live under --root (default $HEARTH_HOME/rag). Ingestion reads only files inside the current
directory and any --allow-root. The embedding model defaults to the one the index was built with (the
bundled all-MiniLM-L6-v2 for a new index); --embedding-model takes a sentence-transformers folder, or
"hashing" for the model-free HashingEmbedder.

A local query loads torch and the embedding model each time (a few seconds); with --url (or $HEARTH_URL)
it asks a running `hearth serve` instead, whose embedder is already loaded: its index of that name, at
POST /v1/rag/indexes/NAME/query, with --api-key (or $HEARTH_API_KEY).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REMOTE_TIMEOUT_S = 60.0  # one query to a server: connect, search, answer
REMOTE_MAX_BYTES = 16 << 20  # the most of a server's answer read (top_k <= 50 chunks is far less)


def add_parser(sub: argparse._SubParsersAction) -> None:
    rag = sub.add_parser("rag", help="build and search retrieval (RAG) indexes", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = rag.add_subparsers(dest="rag_command", metavar="ACTION")
    actions.required = True

    def common(p: argparse.ArgumentParser, index_required: bool = True) -> None:
        p.add_argument("--index", required=index_required, help="index name ([A-Za-z0-9_.-], up to 64)")
        p.add_argument("--root", default=None, help="folder holding the indexes (default $HEARTH_HOME/rag)")
        p.add_argument("--embedding-model", default=None,
                       help="sentence-transformers folder, or 'hashing' (default: the index's own model, "
                            "else the bundled all-MiniLM-L6-v2)")

    ing = actions.add_parser("ingest", help="add or update files and folders (txt, md, html, pdf)")
    ing.add_argument("paths", nargs="+", metavar="PATH")
    common(ing)
    ing.add_argument("--allow-root", action="append", default=[], metavar="DIR",
                     help="another folder files may come from (the current directory always may)")
    ing.add_argument("--kind", default="auto", choices=["auto", "flat", "ivf", "hnsw"],
                     help="FAISS index kind (auto: exact below 20k chunks, HNSW, then IVF)")
    ing.add_argument("--chunk-tokens", type=int, default=200, help="tokens per chunk for a new index")
    ing.add_argument("--overlap-tokens", type=int, default=40, help="tokens shared by neighbouring chunks")
    ing.add_argument("--max-file-mb", type=float, default=32.0, help="largest file read (MiB)")
    ing.add_argument("--max-total-mb", type=float, default=512.0, help="most bytes read in one run (MiB)")
    ing.add_argument("--quiet", action="store_true", help="no progress bars")
    ing.set_defaults(func=run_ingest)

    q = actions.add_parser("query", help="search an index")
    q.add_argument("text", metavar="TEXT")
    common(q)
    q.add_argument("-k", "--top-k", type=int, default=4, help="results (default 4)")
    q.add_argument("--mmr", action="store_true", help="diversify results (maximal marginal relevance)")
    q.add_argument("--mmr-lambda", type=float, default=0.5, help="MMR relevance weight, 0..1 (default 0.5)")
    q.add_argument("--json", action="store_true", help="print the hits as JSON citations")
    q.add_argument("--url", default=os.environ.get("HEARTH_URL") or None,
                   help="query this running hearth server's index instead of loading the embedder here "
                        "(http://HOST:PORT or .../v1; default: $HEARTH_URL)")
    q.add_argument("--api-key", default=None, help="the server's API key (default: $HEARTH_API_KEY)")
    q.set_defaults(func=run_query)

    ls = actions.add_parser("list", help="list indexes, or the documents of one")
    common(ls, index_required=False)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)

    d = actions.add_parser("delete", help="remove documents from an index, or drop it")
    d.add_argument("sources", nargs="*", metavar="SOURCE", help="source names as `hearth rag list` shows them")
    common(d)
    d.add_argument("--drop", action="store_true", help="delete the whole index")
    d.set_defaults(func=run_delete)


def _root(args: argparse.Namespace) -> Path:
    from hearth.runtime.registry import hearth_home

    return Path(args.root).expanduser() if args.root else hearth_home() / "rag"


def _embedder(args: argparse.Namespace, directory: Path):
    """--embedding-model, else the model the index was built with, else the bundled default."""
    from hearth.agents.rag import IndexNotFound, embedder_from_spec, embedder_spec_of
    from hearth.agents.rag.storage import read_meta

    spec = args.embedding_model
    if not spec:
        try:
            spec = embedder_spec_of(read_meta(directory))
        except IndexNotFound:
            spec = None
    if args.func is run_query and not (spec or "").startswith("hashing"):
        print("hearth: loading the embedding model in this process (a few seconds each query; --url or "
              "HEARTH_URL asks a running server instead)", file=sys.stderr, flush=True)
    return embedder_from_spec(spec)


def _open(args: argparse.Namespace, *, create: bool = False, with_embedder: bool = True, **kw):
    from hearth.agents.rag import IndexNotFound, RagIndex, check_index_name
    from hearth.agents.rag.storage import read_current

    directory = _root(args) / check_index_name(args.index)
    if not create and read_current(directory) is None:  # say so before loading an embedding model
        raise IndexNotFound(f"no RAG index named {args.index!r} under {directory.parent}")
    embedder = _embedder(args, directory) if with_embedder else None
    return RagIndex.open(directory, embedder, create=create, **kw)


def run_ingest(args: argparse.Namespace) -> int:
    from hearth.agents.rag.extract import collect_files

    roots = [Path.cwd(), *args.allow_root]
    max_file = int(args.max_file_mb * (1 << 20))
    collect_files(args.paths, roots, max_file)  # bad paths fail here, before an embedding model loads
    index = _open(args, create=True, kind=args.kind, chunk_tokens=args.chunk_tokens,
                  overlap_tokens=args.overlap_tokens)
    rep = index.ingest(args.paths, allowed_roots=roots, max_file_bytes=max_file,
                       max_total_bytes=int(args.max_total_mb * (1 << 20)), progress=not args.quiet)
    for path, reason in rep.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    info = index.info()
    print(f"{index.name} v{rep.version}: {len(rep.added)} added, {len(rep.replaced)} replaced, "
          f"{len(rep.unchanged)} unchanged, {len(rep.skipped)} skipped; {info['documents']} documents, "
          f"{info['chunks']} chunks ({info['index_kind']} index) in {index.directory}")
    return 0


def run_query(args: argparse.Namespace) -> int:
    from hearth.agents.rag import citations

    if args.url:
        name, version, cites = _remote_query(args)
    else:
        index = _open(args)
        hits = index.query(args.text, args.top_k, mmr=args.mmr, mmr_lambda=args.mmr_lambda)
        name, version, cites = index.name, index.version, citations(hits)
    if args.json:
        print(json.dumps({"index": name, "version": version, "hits": cites}, ensure_ascii=False, indent=1))
        return 0
    if not cites:
        print(f"(the index {name} has no documents)", file=sys.stderr)
    for c in cites:
        text = " ".join(str(c.get("text", "")).split())
        print(f"[{c['index']}] {c['score']:.3f}  {c['source']}#{c['chunk_id']}  chars {c['start']}-{c['end']}\n    "
              f"{text[:300]}{' ...' if len(text) > 300 else ''}")
    return 0


def _remote_query(args: argparse.Namespace) -> tuple[str, int | None, list[dict]]:
    """(index, version, citations) from a running server; any failure is one HearthError line."""
    from urllib.parse import quote

    import httpx

    from hearth.agents.rag import check_index_name
    from hearth.runtime.errors import HearthError

    name = check_index_name(args.index)
    base = args.url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    url = f"{base}/v1/rag/indexes/{quote(name, safe='')}/query"
    key = args.api_key or os.environ.get("HEARTH_API_KEY") or None
    body = {"query": args.text, "top_k": args.top_k, "mmr": args.mmr, "mmr_lambda": args.mmr_lambda}
    try:
        with httpx.Client(timeout=REMOTE_TIMEOUT_S, headers={"Authorization": f"Bearer {key}"} if key else {},
                          trust_env=False) as client, client.stream("POST", url, json=body) as r:
            data = bytearray()
            for part in r.iter_bytes():
                data += part
                if len(data) > REMOTE_MAX_BYTES:
                    raise HearthError(f"{base} answered with more than {REMOTE_MAX_BYTES >> 20} MiB; not a "
                                      "hearth RAG answer")
    except httpx.HTTPError as e:
        raise HearthError(f"cannot query {base}: {type(e).__name__}: {str(e) or 'no answer'} (is `hearth serve` "
                          "running there?)") from None
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if r.status_code != 200:
        message = answer.get("error", {}).get("message") if isinstance(answer, dict) \
            and isinstance(answer.get("error"), dict) else None
        raise HearthError(f"{base} answered {r.status_code}: {message or 'no error message'}")
    fields = ("index", "score", "source", "chunk_id", "start", "end")
    if not isinstance(answer, dict) or not isinstance(answer.get("data"), list) or not all(
            isinstance(c, dict) and all(f in c for f in fields) for c in answer["data"]):
        raise HearthError(f"{base} did not answer like a hearth server (its reply holds no list of hits)")
    return str(answer.get("index", name)), answer.get("version"), answer["data"]


def run_list(args: argparse.Namespace) -> int:
    from hearth.agents.rag import check_index_name
    from hearth.agents.rag.storage import read_meta

    root = _root(args)
    if args.index is None:
        from hearth.agents.rag import IndexStore

        rows = []
        for name in IndexStore(root, lambda: None).names():
            m = read_meta(root / name)
            rows.append({"name": name, "version": m["version"], "documents": len(m["docs"]),
                         "chunks": m["chunks"], "index_kind": m["index_kind"], "embedder": m["embedder"]["name"]})
        if args.json:
            print(json.dumps(rows, indent=1))
        elif not rows:
            print(f"(no indexes under {root})", file=sys.stderr)
        for r in rows if not args.json else []:
            print(f"{r['name']}\tv{r['version']}\t{r['documents']} documents\t{r['chunks']} chunks\t"
                  f"{r['index_kind']}\t{r['embedder']}")
        return 0
    m = read_meta(root / check_index_name(args.index))
    docs = [{"source": s, **d} for s, d in sorted(m["docs"].items())]
    if args.json:
        print(json.dumps({"index": args.index, "version": m["version"], "documents": docs}, indent=1,
                         ensure_ascii=False))
        return 0
    print(f"{args.index} v{m['version']}: {len(docs)} documents, {m['chunks']} chunks, {m['index_kind']} index, "
          f"embedder {m['embedder']['name']}", file=sys.stderr)
    for d in docs:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(d["added"]))
        print(f"{d['source']}\t{d['chunks']} chunks\t{d['size']} bytes\t{when}\t{d['sha256'][:12]}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from hearth.agents.rag import IndexStore
    from hearth.agents.types import AgentInputError

    if args.drop:
        if args.sources:
            raise AgentInputError("--drop deletes the whole index; give no sources with it", "sources")
        IndexStore(_root(args), lambda: None).drop(args.index)
        print(f"dropped the index {args.index}")
        return 0
    if not args.sources:
        raise AgentInputError("name the sources to delete (or --drop for the whole index)", "sources")
    index = _open(args, with_embedder=False)
    removed = index.delete(args.sources)
    print(f"{index.name} v{index.version}: removed {len(args.sources)} documents ({removed} chunks)")
    return 0
