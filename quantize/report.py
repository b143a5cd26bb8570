"""The quality report and gate of a quantized artifact, measured against its parent.

    quantize report ARTIFACT [--against PARENT] [--max-ppl-increase PCT] [--quick]

    from hearth.quantize.report import ParentCache, evaluate, gate, save_report
    with ParentCache() as cache:                       # one parent run shared by several artifacts
        report = evaluate("out/model-gptq", parent_cache=cache)
        save_report(report, "out/model-gptq")          # hearth.json metrics, report.md, report.png
        gate(report, max_ppl_increase_pct=5.0)         # QualityGateError when the increase is larger

What it measures (parent = the manifest's parent, or `against`): size on disk, against the parent and
against the same weights in f16 and fp32 (parameter count x 2 or 4 bytes); perplexity on a
built-in held-out English and Chinese text; mean KL(parent || artifact) of the next-token
distributions and top-1 agreement on the same token ids; greedy-answer agreement on 20 chat prompts;
single-stream decode tok/s through hearth's Engine. Measurement lives in report_eval.py, tables and
plots in report_render.py.

The gate compares the perplexity increase with a threshold set for full reports. A quick report (a
shorter text in shorter windows, fewer prompts) does not check it: its increase is not comparable (on the
default model bnb int8 reads +6.1% quick and +1.7% full, q4_k_m +7.9% and +5.5%); it says so instead.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from hearth.runtime.checkpoint import (CheckpointInfo, Manifest, content_hash, inspect_checkpoint,
                                       read_gguf_metadata, read_manifest, update_metrics)
from hearth.runtime.errors import ModelNotFoundError
from hearth.runtime.registry import GGUF_MANIFEST_KEY

from .common import QualityGateError, QuantizeError, atomic_output, say, size_on_disk
from .report_eval import LANGS, EvalConfig, ParentCache, data_hash, ppl, run_artifact
from .report_render import markdown_table, plot_report, plot_reports, report_markdown

__all__ = ["Report", "ParentCache", "EvalConfig", "evaluate", "save_report", "gate", "markdown_table",
           "plot_reports", "resolve_parent", "report_paths"]

GGUF_QUALITY_KEY = "hearth.quality"
MANIFEST_METRICS_KEY = "quality"
GATE_PASS, GATE_FAIL, GATE_NOT_CHECKED = "pass", "fail", "not checked (quick report)"


@dataclass
class Report:
    """The numbers of one artifact against its parent. Perplexities are per token (exp of the mean
    negative log-likelihood); KL is in nats per token; agreements are fractions in [0, 1]."""

    artifact: str
    parent: str
    artifact_format: str = ""
    """"hf-safetensors" or "gguf"."""
    parent_format: str = ""
    method: str = ""
    """The artifact manifest's method (e.g. "gptq-int4"), if it has one."""
    backend: str = ""
    """hearth runtime backend that ran the artifact ("transformers" or "llama.cpp")."""
    parent_backend: str = ""
    size_bytes: int = 0
    parent_size_bytes: int = 0
    size_ratio: float = float("nan")
    """Size on disk / the parent's."""
    n_params: int = 0
    """Parameters of the parent (from its safetensors headers or GGUF tensors)."""
    size_vs_f16: float = float("nan")
    """Size on disk / (n_params x 2 bytes): against the same model in f16, the usual yardstick."""
    size_vs_fp32: float = float("nan")
    """Size on disk / (n_params x 4 bytes)."""
    parent_origin: str = ""
    """Where the parent's weights came from when its manifest says (e.g. dequantized from a Q4_1 GGUF)."""
    ppl_en: float = float("nan")
    ppl_zh: float = float("nan")
    ppl: float = float("nan")
    """Both texts together."""
    ppl_parent_en: float = float("nan")
    ppl_parent_zh: float = float("nan")
    ppl_parent: float = float("nan")
    ppl_increase_pct: float = float("nan")
    """100 * (ppl / ppl_parent - 1)."""
    kl_mean: float = float("nan")
    kl_en: float = float("nan")
    kl_zh: float = float("nan")
    kl_p50: float = float("nan")
    kl_p99: float = float("nan")
    kl_max: float = float("nan")
    top1_agreement: float = float("nan")
    greedy_exact: float = float("nan")
    """Fraction of prompts whose greedy answers are identical token for token."""
    greedy_prefix: float = float("nan")
    """Mean over prompts of (shared leading tokens) / (longer answer's length)."""
    decode_tok_s: float | None = None
    """Single-stream greedy decode speed through hearth's Engine (prefill excluded)."""
    parent_decode_tok_s: float | None = None
    n_tokens_en: int = 0
    n_tokens_zh: int = 0
    n_prompts: int = 0
    max_new_tokens: int = 0
    window: int = 0
    stride: int = 0
    quick: bool = False
    tokenizer_match: bool = True
    """The artifact's tokenizer gives the parent's ids for the held-out text."""
    parent_hash_match: bool | None = None
    """The parent's content hash equals the one pinned in the artifact's manifest (None: not pinned)."""
    data_hash: str = ""
    max_ppl_increase: float | None = None
    """The gate's threshold in percent, once gate() was given one."""
    gate_result: str = ""
    """GATE_PASS, GATE_FAIL, GATE_NOT_CHECKED, or "" when no gate was set."""
    notes: list[str] = field(default_factory=list)
    created: str = ""
    seconds: float = 0.0
    kl_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Per-token KL values (for the plot); not serialized."""

    @property
    def label(self) -> str:
        return Path(self.artifact).name

    @property
    def n_tokens(self) -> int:
        return self.n_tokens_en + self.n_tokens_zh

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values; non-finite floats become None."""
        out = {}
        for f in fields(self):
            if f.name == "kl_tokens":
                continue
            v = getattr(self, f.name)
            out[f.name] = None if isinstance(v, float) and not math.isfinite(v) else v
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        known = {f.name for f in fields(cls)} - {"kl_tokens"}
        kw = {k: v for k, v in data.items() if k in known}
        for f in fields(cls):  # None back to NaN for the float metrics
            if f.name in kw and kw[f.name] is None and f.type == "float":
                kw[f.name] = float("nan")
        return cls(**kw)

    def to_markdown(self) -> str:
        return report_markdown(self)


# ----------------------------------------------------------------------------- lineage


def _artifact_info(artifact: str | os.PathLike) -> CheckpointInfo:
    p = Path(artifact).expanduser()
    if not p.exists():
        raise ModelNotFoundError(f"no artifact at {p}")
    info = inspect_checkpoint(p)
    if info.format not in ("hf-safetensors", "gguf"):
        raise QuantizeError(f"{p} is a {info.format} checkpoint; a report needs an HF safetensors "
                            "directory or a GGUF file")
    return info


def _model_path(info: CheckpointInfo) -> Path:
    """What a backend opens: the directory of an HF checkpoint, the file of a GGUF."""
    return info.model_file if info.format == "gguf" else info.path


def artifact_manifest(artifact: str | os.PathLike) -> Manifest | None:
    """An HF dir's hearth.json; a GGUF's `hearth.manifest` metadata (or, for a GGUF alone in a dir
    without safetensors, that dir's hearth.json)."""
    info = _artifact_info(artifact)
    if info.format != "gguf":
        return info.manifest
    meta = read_gguf_metadata(info.model_file)
    raw = meta.get(GGUF_MANIFEST_KEY)
    if raw:
        try:
            return Manifest.from_dict(json.loads(raw))
        except (ValueError, TypeError) as e:
            raise QuantizeError(f"{info.model_file} has an invalid {GGUF_MANIFEST_KEY} metadata value: {e}") from e
    folder = info.model_file.parent
    if not any(folder.glob("*.safetensors")):
        return read_manifest(folder)
    return None


def resolve_parent(artifact: str | os.PathLike, against: str | os.PathLike | None = None
                   ) -> tuple[Path, str | None]:
    """(parent path, pinned content hash or None). `against` wins over the manifest's parent."""
    art = Path(artifact).expanduser()
    manifest = artifact_manifest(art)
    pinned_parent = manifest.parent if manifest is not None else None
    if against is not None:
        parent = Path(against).expanduser()
        if not parent.exists():
            raise ModelNotFoundError(f"no parent checkpoint at {parent} (given with --against)")
        pinned = None
        if pinned_parent is not None and _same_path(Path(pinned_parent.path), parent, art):
            pinned = pinned_parent.content_hash
        return parent, pinned
    if pinned_parent is None:
        raise QuantizeError(f"{art} names no parent (no hearth manifest with a parent); "
                            "give the model to compare against with --against PARENT")
    parent = _relative_to(Path(pinned_parent.path), art)
    if not parent.exists():
        raise ModelNotFoundError(f"the parent of {art}, {parent} (from its manifest), does not exist; "
                                 "give the model to compare against with --against PARENT")
    return parent, pinned_parent.content_hash


def _relative_to(p: Path, artifact: Path) -> Path:
    base = artifact if artifact.is_dir() else artifact.parent
    return p if p.is_absolute() else base / p


def _same_path(a: Path, b: Path, artifact: Path) -> bool:
    try:
        return _relative_to(a, artifact).resolve() == b.resolve()
    except OSError:
        return False


def parent_origin(pinfo: CheckpointInfo) -> str:
    """"dequantized to float32 from the Q4_1 GGUF NAME" when the parent's manifest says it was built from
    a quantized GGUF (the registry's default model is); the GGUF's type is read from the file when it is
    still there. "" otherwise."""
    manifest = pinfo.manifest
    if manifest is None or manifest.method != "gguf-dequantize":
        return ""
    dtype = manifest.parameters.get("dtype", "float")
    source = Path(manifest.parent.path) if manifest.parent is not None else None
    name = manifest.parameters.get("gguf_file") or (source.name if source else "a GGUF file")
    kind = ""
    if source is not None and source.is_file():
        try:
            import gguf
            kind = gguf.LlamaFileType(int(read_gguf_metadata(source)["general.file_type"])).name
            kind = kind.removeprefix("MOSTLY_").removeprefix("ALL_") + " "
        except (KeyError, ValueError, TypeError, OSError):
            kind = ""
    return f"dequantized to {dtype} from the {kind}GGUF {name}"


def param_count(info: CheckpointInfo) -> int:
    """Parameters of a checkpoint from its weight files' headers (safetensors) or tensor list (GGUF)."""
    try:
        if info.format == "gguf":
            import gguf
            return int(sum(int(t.n_elements) for t in gguf.GGUFReader(str(info.model_file)).tensors))
        total = 0
        for f in info.weight_files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            total += sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
        return total
    except (OSError, ValueError, KeyError, TypeError):
        return 0


# ----------------------------------------------------------------------------- evaluate


def evaluate(artifact: str | os.PathLike, against: str | os.PathLike | None = None, *, quick: bool = False,
             parent_cache: ParentCache | None = None, config: EvalConfig | None = None,
             progress: bool = True) -> Report:
    """Measure an artifact against its parent (see the module docstring). Pass one ParentCache to
    several calls to measure their common parent once; `config` overrides what `quick` picks."""
    t0 = time.monotonic()
    cfg = config or EvalConfig.for_mode(quick)
    info = _artifact_info(artifact)
    art_path = _model_path(info)
    parent_path, pinned = resolve_parent(artifact, against)
    pinfo = inspect_checkpoint(parent_path)
    if pinfo.format not in ("hf-safetensors", "gguf"):
        raise QuantizeError(f"the parent {parent_path} is a {pinfo.format} checkpoint; a report needs an HF "
                            "safetensors directory or a GGUF file")
    manifest = artifact_manifest(artifact)

    own_cache = parent_cache is None
    cache = ParentCache() if own_cache else parent_cache
    try:
        parent = cache.get(_model_path(pinfo), pinfo.format, cfg, progress)
        hash_match = None
        if pinned is not None:
            if parent.hash is None:
                parent.hash = content_hash(parent_path)
            hash_match = parent.hash == pinned
        run = run_artifact(art_path, info.format, parent, cfg, progress)
    finally:
        if own_cache:
            cache.close()

    notes = list(run.notes)
    origin = parent_origin(pinfo)
    if origin:
        notes.append(f"the parent was {origin} (its manifest says so): its weights already sit on that "
                     "file's quantization grid, so this artifact re-rounds them and its loss is larger than "
                     "it would be from the original full-precision model")
    if parent.measured:
        notes.append(f"the parent's numbers (decode tok/s included) were measured {parent.measured} and read "
                     "from the report cache (same content hash and settings; --no-cache measures again)")
    if hash_match is False:
        notes.append(f"the parent {parent_path} changed since the artifact was made (content hash differs "
                     "from the manifest's)")
    for note in notes:
        say(f"note: {note}")
    nll = {lang: run.compare[lang].nll for lang in LANGS}
    n = {lang: run.compare[lang].n for lang in LANGS}
    pnll = {lang: run.compare[lang].parent_nll for lang in LANGS}  # over the same ids as the artifact
    kl = {lang: np.concatenate(run.compare[lang].kl) for lang in LANGS}
    kl_all = np.concatenate([kl[lang] for lang in LANGS])
    top1 = sum(run.compare[lang].top1_same for lang in LANGS) / sum(n.values())
    ppl_all = ppl(sum(nll.values()), sum(n.values()))
    ppl_parent = ppl(sum(pnll.values()), sum(n.values()))
    size, psize = size_on_disk(art_path), size_on_disk(_model_path(pinfo))
    n_params = param_count(pinfo)
    return Report(
        artifact=str(Path(artifact).expanduser().resolve()), parent=str(parent_path.resolve()),
        artifact_format=info.format, parent_format=pinfo.format,
        method=manifest.method if manifest is not None else "", backend=run.backend,
        parent_backend=parent.backend, size_bytes=size, parent_size_bytes=psize,
        size_ratio=size / psize if psize else float("nan"), n_params=n_params,
        size_vs_f16=size / (2 * n_params) if n_params else float("nan"),
        size_vs_fp32=size / (4 * n_params) if n_params else float("nan"), parent_origin=origin,
        ppl_en=ppl(nll["en"], n["en"]), ppl_zh=ppl(nll["zh"], n["zh"]), ppl=ppl_all,
        ppl_parent_en=ppl(pnll["en"], n["en"]), ppl_parent_zh=ppl(pnll["zh"], n["zh"]), ppl_parent=ppl_parent,
        ppl_increase_pct=100.0 * (ppl_all / ppl_parent - 1.0),
        kl_mean=float(kl_all.mean()), kl_en=float(kl["en"].mean()), kl_zh=float(kl["zh"].mean()),
        kl_p50=float(np.quantile(kl_all, 0.5)), kl_p99=float(np.quantile(kl_all, 0.99)),
        kl_max=float(kl_all.max()), top1_agreement=top1,
        greedy_exact=run.greedy_exact, greedy_prefix=run.greedy_prefix,
        decode_tok_s=run.decode_tok_s, parent_decode_tok_s=parent.decode_tok_s,
        n_tokens_en=n["en"], n_tokens_zh=n["zh"], n_prompts=len(cfg.prompts), max_new_tokens=cfg.max_new_tokens,
        window=parent.window, stride=min(cfg.stride, parent.window), quick=cfg.quick,
        tokenizer_match=run.tokenizer_match, parent_hash_match=hash_match, data_hash=data_hash(cfg),
        notes=notes, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        seconds=round(time.monotonic() - t0, 1), kl_tokens=kl_all)


# ----------------------------------------------------------------------------- gate and save


def gate(report: Report, max_ppl_increase_pct: float | None) -> None:
    """Record the gate in the report (its page and plot show it) and raise QualityGateError when the
    perplexity rose more than allowed (or could not be measured). A quick report is not gated: its
    increase is not comparable to the full report's the thresholds are set for; it says so instead."""
    if max_ppl_increase_pct is None:
        return
    report.max_ppl_increase = max_ppl_increase_pct
    if report.quick:
        report.gate_result = GATE_NOT_CHECKED
        say(f"{report.label}: the quality gate (perplexity +{max_ppl_increase_pct:g}% at most) is not checked "
            f"on a quick report: quick reports score {report.n_tokens} tokens in {report.window}-token windows "
            f"and their increase runs higher and noisier than a full report's; run without --quick to check it")
        return
    inc = report.ppl_increase_pct
    if inc is None or not math.isfinite(inc) or inc > max_ppl_increase_pct:
        report.gate_result = GATE_FAIL
        measured = "could not be measured (non-finite)" if inc is None or not math.isfinite(inc) else f"{inc:+.2f}%"
        raise QualityGateError(
            f"quality gate failed for {report.label}: perplexity increase over the parent is {measured} "
            f"(artifact {report.ppl:.4g}, parent {report.ppl_parent:.4g}); allowed at most "
            f"{max_ppl_increase_pct:+.2f}%")
    report.gate_result = GATE_PASS


def report_paths(artifact: str | os.PathLike) -> tuple[Path, Path]:
    """(report.md, report.png): inside an HF dir; `<file>.report.md/.png` beside a GGUF."""
    info = _artifact_info(artifact)
    if info.format == "gguf":
        f = info.model_file
        return f.with_name(f.name + ".report.md"), f.with_name(f.name + ".report.png")
    return info.path / "report.md", info.path / "report.png"


def save_report(report: Report, artifact: str | os.PathLike) -> list[Path]:
    """Write the metrics into the artifact (hearth.json `metrics.quality`, or GGUF metadata
    `hearth.quality`) and report.md / report.png beside it; returns the paths written."""
    info = _artifact_info(artifact)
    data = report.to_dict()
    written: list[Path] = []
    if info.format == "gguf":
        f = info.model_file
        # a link (the registry's, into an installed package) would become a rewritten copy whose
        # content hash no longer matches what the checkpoints derived from it pin
        if f.is_symlink():
            say(f"{f} is a symlink; its GGUF metadata is left as it is (copy the file to keep metrics in it)")
        else:
            from .gguf import write_metadata
            write_metadata(f, {GGUF_QUALITY_KEY: json.dumps(data, ensure_ascii=False)})
            written.append(f)
    elif info.manifest is not None:
        update_metrics(info.path, **{MANIFEST_METRICS_KEY: data})
        written.append(info.path / "hearth.json")
    else:
        say(f"{info.path} has no hearth.json; the metrics are only in report.md")
    md, png = report_paths(artifact)
    with atomic_output(md, is_file=True) as tmp:
        tmp.write_text(report.to_markdown(), encoding="utf-8")
    with atomic_output(png, is_file=True) as tmp:
        plot_report(report, tmp)
    return written + [md, png]


def load_saved_report(artifact: str | os.PathLike) -> Report | None:
    """The Report saved into an artifact by save_report, or None if it has none."""
    info = _artifact_info(artifact)
    if info.format == "gguf":
        raw = read_gguf_metadata(info.model_file).get(GGUF_QUALITY_KEY)
        data = json.loads(raw) if raw else None
    else:
        data = (info.manifest.metrics.get(MANIFEST_METRICS_KEY) if info.manifest is not None else None)
    return Report.from_dict(data) if data else None
