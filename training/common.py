"""What the training stages share: recipes into typed configs, run folders, atomic checkpoints with
lineage, resume, metrics JSONL and the loss-curve PNG. Each stage script stays self-contained on top.

    cfg = load_config(SFTConfig, "training/recipes/sft_lora.yaml", overrides={"max_steps": 10})
    run = RunDir(cfg.output_dir)                     # <out>/checkpoints/step-N, metrics.jsonl, loss.png
    start = run.latest()                             # None, or the last complete checkpoint to resume from
    log = MetricsLog(run.metrics, resume_step=start.step if start else None)
    ...
    run.save_checkpoint(step, lambda tmp: model.save_pretrained(tmp), state={...})   # atomic
    publish(run.out, lambda tmp: ..., manifest)      # the final model, HF layout + hearth.json, atomic

Nothing here imports torch at module level.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from hearth.runtime.checkpoint import Manifest, Parent, content_hash, write_manifest
from hearth.runtime.errors import HearthError
from hearth.runtime.fileio import TMP_MARK, atomic_write_text  # noqa: F401  (re-exported for the stages)

T = TypeVar("T")
STATE_FILE = "training_state.json"


class TrainingConfigError(HearthError, ValueError):
    """A recipe or config value is wrong; the message names the file and the field."""


class TrainingDataError(HearthError, ValueError):
    """A data record is wrong; the message names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, problem: str):
        where = f"{path}" + (f":{line}" if line is not None else "") + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field = str(path), line, field


def say(msg: str) -> None:
    print(f"train: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- configs


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a YAML value against a dataclass field type (simple types, Optional, list, dict, Literal)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except TrainingConfigError as e:
                errors.append(str(e))
        raise TrainingConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise TrainingConfigError(f"{where}: must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TrainingConfigError(f"{where}: must be a list; got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainingConfigError(f"{where}: must be a mapping; got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise TrainingConfigError(f"{where}: must be a mapping; got {value!r}")
        return config_from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise TrainingConfigError(f"{where}: must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainingConfigError(f"{where}: must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-4 as a string; accept numeric strings for floats
            try:
                return float(value) if isinstance(value, str) else _raise()
            except (ValueError, TypeError):
                raise TrainingConfigError(f"{where}: must be a number; got {value!r}") from None
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TrainingConfigError(f"{where}: must be a string; got {value!r}")
        return str(value)
    return value


def _raise() -> Any:
    raise ValueError


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a config dataclass from a mapping; unknown keys and wrong types name the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise TrainingConfigError(f"{where}: unknown key(s) {unknown}; {cls.__name__} takes {sorted(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise TrainingConfigError(f"{where}: {e}") from None
    except ValueError as e:  # __post_init__ checks
        if isinstance(e, TrainingConfigError):
            raise
        raise TrainingConfigError(f"{where}: {e}") from None


PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # holds training/data/... in the source tree and installed


def bundled_path(path: str | os.PathLike) -> Path:
    """A data path as given (relative to the working dir), else the same path under the installed package,
    so the bundled recipes' `training/data/...` run from anywhere. Unchanged when neither exists."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    return PACKAGE_ROOT / p if (PACKAGE_ROOT / p).exists() else p


def find_file(path: str, field_name: str) -> Path:
    """bundled_path, which must exist; the error names the config field."""
    p = bundled_path(path)
    if not p.exists():
        raise TrainingConfigError(f"{field_name}: no file at {path}")
    return p


def load_config(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML recipe into `cls`; `overrides` (e.g. from the command line) win over the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainingConfigError(f"no recipe at {path}") from None
    except yaml.YAMLError as e:
        raise TrainingConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{path}: a recipe is a mapping of {cls.__name__} fields")
    data.update(overrides or {})
    return config_from_dict(cls, data, str(path))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs from the command line, values read as YAML (`max_steps=10`, `lora=true`)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise TrainingConfigError(f"override {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


# ----------------------------------------------------------------------------- atomic writes


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Create `final` by filling a temp dir beside it and renaming it in; a failure leaves no trace."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}{TMP_MARK}"))
    tmp.chmod(0o755)
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}{TMP_MARK}old-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------- run folders


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    """What the stage saved with it (epoch, data position, rng seeds, best loss ...)."""


class RunDir:
    """<out>/checkpoints/step-N (complete ones only: each is renamed in whole), metrics.jsonl, loss.png.
    The final model is written to <out> itself by `publish`."""

    _STEP = re.compile(r"^step-(\d+)$")

    def __init__(self, out: str | os.PathLike, keep: int = 2):
        self.out = Path(out).expanduser().resolve()
        self.checkpoints = self.out / "checkpoints"
        self.metrics = self.out / "metrics.jsonl"
        self.plot = self.out / "loss.png"
        self.keep = keep
        self.out.mkdir(parents=True, exist_ok=True)
        for p in list(self.out.glob(f".*{TMP_MARK}*")) + list(self.checkpoints.glob(f".*{TMP_MARK}*")):
            shutil.rmtree(p, ignore_errors=True)  # leftovers of a killed run

    def list(self) -> list[Checkpoint]:
        found = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                m = self._STEP.match(p.name)
                if m and (p / STATE_FILE).is_file():
                    state = json.loads((p / STATE_FILE).read_text(encoding="utf-8"))
                    found.append(Checkpoint(p, int(m.group(1)), state))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> Checkpoint | None:
        found = self.list()
        return found[-1] if found else None

    def save_checkpoint(self, step: int, fill: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """`fill(tmp)` writes model/optimizer files; the state JSON is written last, then the rename."""
        def write(tmp: Path) -> None:
            fill(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=2), encoding="utf-8")

        path = atomic_dir(self.checkpoints / f"step-{step}", write)
        for old in self.list()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old.path, ignore_errors=True)
        return path


def publish(out: str | os.PathLike, fill: Callable[[Path], None], manifest: Manifest) -> Path:
    """Write the final model files into `out` (beside checkpoints/ and metrics): weights, config,
    tokenizer and `hearth.json` appear together. Earlier model files in `out` are replaced."""
    out = Path(out)
    staged = Path(tempfile.mkdtemp(dir=out, prefix=f".final{TMP_MARK}"))
    try:
        fill(staged)
        write_manifest(staged, manifest)
        # drop the previous final model's files first, so no stale shard survives next to the new ones
        keep = {"checkpoints", "metrics.jsonl", "loss.png", staged.name}
        for p in out.iterdir():
            if p.name not in keep and not p.name.startswith("."):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        for p in staged.iterdir():
            p.chmod(0o755 if p.is_dir() else 0o644)
            os.replace(p, out / p.name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return out


def stage_manifest(stage: str, method: str, parent: str | os.PathLike | None, parameters: dict[str, Any],
                   data_files: list[str | os.PathLike] = (), metrics: dict[str, Any] | None = None) -> Manifest:
    """The manifest of a stage's output: parent pinned by content hash, each data file by its sha256."""
    par = None
    if parent is not None:
        p = Path(parent).resolve()
        par = Parent(path=str(p), content_hash=content_hash(p))
    data_hashes = {Path(f).name: content_hash(f) for f in data_files}
    return Manifest(stage=stage, method=method, parent=par, parameters=_jsonable(parameters),
                    data_hashes=data_hashes, metrics=dict(metrics or {}))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """Append-only JSONL of training metrics (one object per line, flushed each write). On resume from
    step N, lines after step N (written by the killed run after its last checkpoint) are dropped."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        else:
            kept = [r for r in self.read() if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, **record: Any) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")
            f.flush()

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything before it stands
        return out


def plot_metrics(metrics: str | os.PathLike, png: str | os.PathLike, keys: tuple[str, ...] = ("loss", "eval_loss"),
                 title: str = "") -> Path | None:
    """Loss curves (one line per key present) against step, written atomically; None if nothing to plot."""
    records = _read_jsonl(Path(metrics))
    series = {k: [(r["step"], r[k]) for r in records if k in r and "step" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 40 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    png = Path(png)
    fd, tmp = tempfile.mkstemp(dir=png.parent, prefix=f".{png.name}{TMP_MARK}", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, png)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return png


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    log = MetricsLog.__new__(MetricsLog)
    log.path = path
    return log.read()


# ----------------------------------------------------------------------------- devices and memory


def pick_precision(device: str, want: str = "auto") -> str:
    """"bf16", "fp16" or "fp32": auto picks bf16 where the GPU has it, fp16 on older GPUs, fp32 on CPU."""
    if want != "auto":
        if want not in ("bf16", "fp16", "fp32"):
            raise TrainingConfigError(f"precision must be auto, bf16, fp16 or fp32; got {want!r}")
        return want
    if not device.startswith("cuda"):
        return "fp32"
    import torch
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _status_kb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> float | None:
    """Reset this process's peak-RSS mark (Linux /proc/self/clear_refs) and return the current RSS in MB,
    so the peak measured afterwards is the training loop's own, not model loading's. None elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    rss = _status_kb("VmRSS")
    return rss / 1024 if rss is not None else None


def training_peak_mb(rss_after_load_mb: float | None) -> dict[str, float]:
    """RSS after loading and the peak since reset_peak_rss (Linux), for the stage's metrics."""
    hwm = _status_kb("VmHWM")
    if rss_after_load_mb is None or hwm is None:
        return {}
    return {"rss_after_load_mb": rss_after_load_mb, "train_peak_rss_mb": hwm / 1024}


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when a GPU was used), in MB."""
    import resource

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        import torch
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    return out
