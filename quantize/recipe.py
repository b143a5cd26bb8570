"""One checkpoint to several artifacts in one run, each followed by its quality report.

    quantize recipe quantize/recipes/smollm2.yaml            # or: from hearth.quantize.recipe import run_recipe

    source: smollm2-135m-instruct     # a registered model name or an HF checkpoint dir
    output_dir: artifacts/smollm2     # relative paths start in the current directory
    report: {quick: false, max_ppl_increase: null}
    artifacts:
      - {name: gptq-int4, method: gptq, bits: 4, group_size: 128, max_ppl_increase: 10}
      - {name: bnb-int8, method: bnb, mode: int8, max_ppl_increase: 1}
      - {name: q8_0.gguf, method: gguf, type: q8_0}
      - {name: merged, method: merge, adapter: path/to/lora, base_4bit: true}

A re-run skips every artifact already built from the same source with the same settings (after a crash,
the finished ones stay), unless `force`; anything else already at an artifact's path is refused before
any work starts, unless `force`. The parent's logits and answers are computed once and reused
for every report. At the end: summary.md, summary.json and summary.png in output_dir.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from hearth.runtime.checkpoint import content_hash, read_manifest
from hearth.runtime.errors import HearthError

from .common import OutputExistsError, QualityGateError, QuantizeError, atomic_write_text, say

METHODS = ("gptq", "bnb", "merge", "gguf")
# the settings each method takes, with their defaults (mirrors the function signatures)
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "gptq": {"bits": 4, "group_size": 128, "desc_act": False, "calib": "builtin", "num_samples": 128,
             "seq_len": 512, "device": None},
    "bnb": {"mode": "int8", "double_quant": False},
    "merge": {"adapter": None, "base_4bit": False},
    "gguf": {"type": "q4_k_m"},
}


@dataclass
class ArtifactSpec:
    """One output of a recipe."""

    name: str
    """File or folder name inside output_dir (a GGUF is a file: end it in .gguf)."""
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    """The method's settings (see METHOD_OPTIONS); unknown keys are an error."""
    max_ppl_increase: float | None = None
    """Quality gate for this artifact, in percent; overrides the recipe-wide one."""
    report: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise QuantizeError(f"artifact name must be a plain file or folder name; got {self.name!r}")
        if self.method not in METHODS:
            raise QuantizeError(f"artifact {self.name}: method must be one of {', '.join(METHODS)}; "
                                f"got {self.method!r}")
        allowed = METHOD_OPTIONS[self.method]
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise QuantizeError(f"artifact {self.name}: unknown option(s) {unknown} for method {self.method}; "
                                f"it takes {sorted(allowed)}")
        self.options = {**allowed, **self.options}
        if self.method == "merge" and not self.options["adapter"]:
            raise QuantizeError(f"artifact {self.name}: method merge needs `adapter` (a LoRA adapter dir)")
        if self.method == "gguf" and not self.name.endswith(".gguf"):
            raise QuantizeError(f"artifact {self.name}: a GGUF artifact is one file; name it *.gguf")
        if self.max_ppl_increase is not None and not (isinstance(self.max_ppl_increase, (int, float))
                                                      and self.max_ppl_increase >= 0):
            raise QuantizeError(f"artifact {self.name}: max_ppl_increase must be a number >= 0")


@dataclass
class Recipe:
    source: str
    """A registered model name (its HF checkpoint) or an HF checkpoint dir."""
    output_dir: str
    artifacts: list[ArtifactSpec]
    quick: bool = False
    """Reports on a shortened text and fewer prompts (CI-sized runs)."""
    max_ppl_increase: float | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    """Where relative paths in the recipe start (the current directory when it was loaded)."""

    def __post_init__(self) -> None:
        if not self.artifacts:
            raise QuantizeError("a recipe needs at least one artifact")
        names = [a.name for a in self.artifacts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise QuantizeError(f"artifact names must be unique; repeated: {dup}")

    def path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and check a recipe file; every error names the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QuantizeError(f"no recipe at {path}") from None
    except yaml.YAMLError as e:
        raise QuantizeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise QuantizeError(f"{path}: a recipe is a mapping with source, output_dir and artifacts")
    known = {"source", "output_dir", "artifacts", "report"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise QuantizeError(f"{path}: unknown key(s) {unknown}; a recipe has {sorted(known)}")
    for key in ("source", "output_dir", "artifacts"):
        if key not in data:
            raise QuantizeError(f"{path}: missing `{key}`")
    report = data.get("report") or {}
    if not isinstance(report, dict) or set(report) - {"quick", "max_ppl_increase"}:
        raise QuantizeError(f"{path}: `report` takes quick and max_ppl_increase")
    if not isinstance(data["artifacts"], list):
        raise QuantizeError(f"{path}: `artifacts` must be a list")
    specs = []
    for i, a in enumerate(data["artifacts"]):
        if not isinstance(a, dict):
            raise QuantizeError(f"{path}: artifacts[{i}] must be a mapping")
        a = dict(a)
        try:
            name, method = a.pop("name"), a.pop("method")
        except KeyError as e:
            raise QuantizeError(f"{path}: artifacts[{i}] needs {e.args[0]!r}") from None
        gate, report_it = a.pop("max_ppl_increase", None), a.pop("report", True)
        try:
            specs.append(ArtifactSpec(name=name, method=method, options=a, max_ppl_increase=gate,
                                      report=bool(report_it)))
        except QuantizeError as e:
            raise QuantizeError(f"{path}: artifacts[{i}]: {e}") from None
    try:
        return Recipe(source=str(data["source"]), output_dir=str(data["output_dir"]), artifacts=specs,
                      quick=bool(report.get("quick", False)), max_ppl_increase=report.get("max_ppl_increase"),
                      base_dir=Path.cwd())
    except QuantizeError as e:
        raise QuantizeError(f"{path}: {e}") from None


def resolve_source(source: str, base_dir: Path | None = None) -> Path:
    """A registered name's HF checkpoint, or a path (relative to base_dir)."""
    from hearth.runtime.registry import resolve_model

    p = Path(source).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    return resolve_model(str(p) if p.exists() else source, prefer="hf")


def build_artifact(method: str, source: Path, out: Path, options: dict[str, Any]) -> Path:
    """Run one method; the keyword names are the method functions' own."""
    opts = {k: v for k, v in options.items()}
    if method == "gptq":
        from .gptq import quantize_gptq
        return quantize_gptq(source, out, **opts)
    if method == "bnb":
        from .bnb import quantize_bnb
        return quantize_bnb(source, out, **opts)
    if method == "merge":
        from .merge import merge_lora
        adapter = opts.pop("adapter")
        return merge_lora(source, adapter, out, **opts)
    if method == "gguf":
        from .gguf import convert
        return convert(source, out, opts.pop("type"))
    raise QuantizeError(f"unknown method {method!r}")


def _already_built(out: Path, source_hash: str, spec: ArtifactSpec) -> bool:
    """True when `out` is a finished artifact of this source with these settings."""
    if not out.exists():
        return False
    try:
        if out.is_file():
            from .gguf import read_hearth_metadata
            meta = read_hearth_metadata(out)
            manifest = meta.get("hearth.manifest") or meta.get("manifest") or {}
            parent = (manifest.get("parent") or {}).get("content_hash")
            params = manifest.get("parameters") or {}
        else:
            m = read_manifest(out)
            if m is None or m.parent is None:
                return False
            parent, params = m.parent.content_hash, m.parameters
    except (HearthError, OSError, ValueError):
        return False
    if parent != source_hash:
        return False
    # every setting the recipe names must be recorded the same (methods may record more)
    wanted = {k: v for k, v in spec.options.items() if k not in ("device", "adapter")}
    if spec.method == "gguf":
        wanted = {"type": spec.options["type"]}
    return all(params.get(k) == v for k, v in wanted.items() if k in params)


@dataclass
class RecipeResult:
    artifacts: dict[str, str] = field(default_factory=dict)
    """artifact name -> path"""
    skipped: list[str] = field(default_factory=list)
    reports: list[Any] = field(default_factory=list)
    failed_gates: list[str] = field(default_factory=list)
    summary_files: list[str] = field(default_factory=list)


def run_recipe(recipe: Recipe, *, force: bool = False, only: list[str] | None = None) -> RecipeResult:
    """Build every artifact (or those named in `only`), report each against the source, write the summary.

    Raises QualityGateError at the end (after everything is built and reported) if any gate failed."""
    from . import report as reports

    source = resolve_source(recipe.source, recipe.base_dir)
    source_hash = content_hash(source)
    out_dir = recipe.path(recipe.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = recipe.artifacts
    if only:
        missing = sorted(set(only) - {a.name for a in specs})
        if missing:
            raise QuantizeError(f"no artifact named {missing} in the recipe; it has {[a.name for a in specs]}")
        specs = [a for a in specs if a.name in only]
    if not force:
        taken = [str(out_dir / a.name) for a in specs
                 if (out_dir / a.name).exists() and not _already_built(out_dir / a.name, source_hash, a)]
        if taken:
            raise OutputExistsError(f"{', '.join(taken)} already exist{'s' if len(taken) == 1 else ''} and "
                                    f"{'was' if len(taken) == 1 else 'were'} not built from this source with "
                                    f"these settings; pass --force to replace")
    result = RecipeResult()
    with reports.ParentCache() as cache:  # the parent is measured once for every artifact
        _build_all(recipe, specs, source, source_hash, out_dir, cache, result, force)
    if result.reports:
        result.summary_files = [str(p) for p in write_summary(result.reports, out_dir)]
    if result.failed_gates:
        raise QualityGateError(f"quality gate failed for {', '.join(result.failed_gates)} "
                               f"(see {out_dir / 'summary.md'})")
    return result


def _build_all(recipe: Recipe, specs: list[ArtifactSpec], source: Path, source_hash: str, out_dir: Path,
               cache: Any, result: RecipeResult, force: bool) -> None:
    from . import report as reports

    for i, spec in enumerate(specs, 1):
        out = out_dir / spec.name
        opts = dict(spec.options)
        if spec.method == "merge":
            opts["adapter"] = str(recipe.path(opts["adapter"]))
        if not force and _already_built(out, source_hash, spec):
            say(f"[{i}/{len(specs)}] {spec.name}: already built from this source, kept ({out})")
            result.skipped.append(spec.name)
        else:
            say(f"[{i}/{len(specs)}] {spec.name}: {spec.method} {json.dumps(opts, default=str)}")
            build_artifact(spec.method, source, out, opts)
        result.artifacts[spec.name] = str(out)
        if not spec.report:
            continue
        say(f"[{i}/{len(specs)}] {spec.name}: quality report against {source}")
        rep = reports.evaluate(out, against=source, quick=recipe.quick, parent_cache=cache)
        result.reports.append(rep)
        gate = spec.max_ppl_increase if spec.max_ppl_increase is not None else recipe.max_ppl_increase
        if gate is not None:
            try:
                reports.gate(rep, gate)
            except QualityGateError as e:
                say(f"{spec.name}: {e}")
                result.failed_gates.append(spec.name)
        reports.save_report(rep, out)  # after the gate, which the report page and plot show


def write_summary(reps: list[Any], out_dir: Path) -> list[Path]:
    """summary.md (the table), summary.json (every number) and summary.png (the comparison plot)."""
    from . import report as reports

    md, js, png = out_dir / "summary.md", out_dir / "summary.json", out_dir / "summary.png"
    atomic_write_text(md, reports.markdown_table(reps) + "\n")
    atomic_write_text(js, json.dumps([r.to_dict() for r in reps], indent=2, default=str) + "\n")
    reports.plot_reports(reps, png)
    return [md, js, png]


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as its YAML would hold it (for the manifest or logs)."""
    d = {f.name: getattr(recipe, f.name) for f in fields(recipe) if f.name not in ("base_dir", "artifacts")}
    d["artifacts"] = [asdict(a) for a in recipe.artifacts]
    return d
