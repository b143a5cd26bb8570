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

import ast
import contextlib
import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from hearth.runtime.checkpoint import MANIFEST_NAME, Manifest, Parent, content_hash, write_manifest
from hearth.runtime.errors import HearthError
from hearth.runtime.fileio import (TMP_MARK, atomic_write_text, commit_dir, make_temp,  # noqa: F401
                                   remove_stale_temps, staged)

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


def progress(total: int | None, label: str, unit: str = "step", initial: int = 0):
    """The one progress bar of every stage (tqdm on stderr): its label, done of total, seconds per unit and the
    time left, the stage's key metrics as postfix. Into a log file (no terminal) it redraws every 30 s."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit=unit, dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


class StepClock:
    """Wall and CPU seconds of one training step (CPU: all of this process's threads), for metrics.jsonl:
    what a step really costs on this machine, however busy it is."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"step_seconds": round(time.perf_counter() - self.wall, 3),
                "step_cpu_seconds": round(time.process_time() - self.cpu, 3)}


@contextlib.contextmanager
def gptqmodel_only_if_needed(model: str | os.PathLike | None):
    """peft imports GPT-QModel to look at every layer it wraps whenever the package is installed, and that
    import prints a banner, changes CUDA environment settings and tries to download kernels. A model with
    no GPTQ/AWQ weights never needs it: for such a model, within this block, GPT-QModel counts as absent."""
    if "gptqmodel" in sys.modules or _gptq_quantized(model):
        yield
        return
    sys.modules["gptqmodel"] = None  # type: ignore[assignment]  # import fails, find_spec says absent
    try:
        yield
    finally:
        if "gptqmodel" in sys.modules and sys.modules["gptqmodel"] is None:
            del sys.modules["gptqmodel"]
        for module in ("peft.import_utils", "transformers.utils.import_utils"):
            check = getattr(sys.modules.get(module), "is_gptqmodel_available", None)
            if hasattr(check, "cache_clear"):  # later code in this process sees the package again
                check.cache_clear()


def _gptq_quantized(model: str | os.PathLike | None) -> bool:
    if model is None:
        return False
    try:
        from hearth.runtime.registry import resolve_model
        config = json.loads((resolve_model(model, prefer="hf") / "config.json").read_text(encoding="utf-8"))
    except (HearthError, OSError, ValueError):
        return False  # the stage itself reports a model it cannot find
    quant = config.get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() in ("gptq", "awq")


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


# One vocabulary for every stage's recipe: the old name -> the name every stage now uses. The old names
# still work, with a warning (`lora: true|false` is `method: lora|full`, handled beside these).
RENAMED_KEYS = {
    "grad_accum": "gradient_accumulation_steps",
    "save_steps": "save_every",
    "target_modules": "lora_target_modules",
    "warmup": "warmup_steps",
}


def _renamed(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """`data` with old key names (RENAMED_KEYS, `lora: bool`) moved to the current ones, each with a warning."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    out = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in out and old not in names and new in names:
            if new in out:
                raise TrainingConfigError(f"{where}: give {new!r} or its old name {old!r}, not both")
            say(f"{where}: {old!r} is now called {new!r} (the old name still works)")
            out[new] = out.pop(old)
    if "lora" in out and "lora" not in names and "method" in names:
        if not isinstance(out["lora"], bool):
            raise TrainingConfigError(f"{where}: lora: must be true or false; got {out['lora']!r}")
        if "method" in out:
            raise TrainingConfigError(f"{where}: give 'method' or its old form 'lora', not both")
        out["method"] = "lora" if out.pop("lora") else "full"
        say(f"{where}: 'lora: true|false' is now 'method: lora|full' (the old form still works)")
    return out


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build a config dataclass from a mapping; unknown keys and wrong types name the field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    data = _renamed(cls, data, where)
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


def bundled(path: str | None) -> str | None:
    """bundled_path as the absolute path a config field holds (None, or a missing file, stays as given): each
    stage's __post_init__ runs its data fields through it, so a recipe's `training/data/...` works from any
    folder and the manifest names the file that was read."""
    if path is None:
        return None
    p = bundled_path(path)
    return str(p.resolve()) if p.exists() else str(path)


def find_file(path: str, field_name: str) -> Path:
    """bundled_path, which must exist; the error names the config field."""
    p = bundled_path(path)
    if not p.exists():
        raise TrainingConfigError(f"{field_name}: no file at {path}")
    return p


def load_config(cls: type[T], path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> T:
    """Read a YAML recipe into `cls`; `overrides` (e.g. from the command line) win over the file. A bundled
    recipe (`training/recipes/...`) is found from any folder, like the bundled data."""
    path = bundled_path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise TrainingConfigError(f"no recipe at {path}") from None
    except yaml.YAMLError as e:
        raise TrainingConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise TrainingConfigError(f"{path}: a recipe is a mapping of {cls.__name__} fields")
    data = _renamed(cls, data, str(path))
    # renamed separately: a new name on the command line beats an old one in the file
    data.update(_renamed(cls, overrides or {}, "command line"))
    return config_from_dict(cls, data, str(path))


# What the fields every stage shares mean, for `--help` where a stage's Config gives no docstring of its own.
COMMON_FIELD_DOCS = {
    "output_dir": "Where the output model, checkpoints/, metrics.jsonl and loss.png go.",
    "method": "full: train every weight; lora: LoRA adapters on a frozen base (qlora, sft only: on an NF4 base).",
    "lora_r": "LoRA rank (adapter width).",
    "lora_alpha": "LoRA scale numerator: the adapter's output is multiplied by lora_alpha / lora_r.",
    "lora_dropout": "Dropout on the adapter's input while training.",
    "lora_target_modules": "Module names LoRA adapts (e.g. q_proj, v_proj).",
    "learning_rate": "Peak AdamW learning rate.",
    "epochs": "Passes over the data (when max_steps is not set).",
    "max_steps": "Optimizer steps to train.",
    "batch_size": "Examples per micro-batch, per device.",
    "gradient_accumulation_steps": "Micro-batches per optimizer step.",
    "weight_decay": "AdamW weight decay (not applied to norms and biases).",
    "adam_beta1": "AdamW beta1.",
    "adam_beta2": "AdamW beta2.",
    "max_grad_norm": "Clip the global gradient norm to this (0: no clipping).",
    "seed": "Seeds data order, initialisation and dropout: same seed, same run.",
    "gradient_checkpointing": "Recompute activations in the backward pass: less memory, about a third more compute.",
    "precision": "auto: bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N.",
    "keep_checkpoints": "How many of the newest checkpoints to keep.",
    "eval_every": "Steps between evaluations of the held-out loss.",
    "logging_steps": "Steps between metrics records.",
    "max_completion_length": "Longest generated answer, in tokens.",
    "temperature": "Sampling temperature of the generated answers.",
    "normalize_advantages": "Divide the advantages by their standard deviation.",
    "mode": "train: a new BPE tokenizer; extend: add tokens to a model's tokenizer and grow its embeddings.",
    "bos_token": "Special token that starts a sequence (train mode).",
    "pad_token": "Special token used for padding (train mode).",
    "unk_token": "Special token for unknown input (train mode).",
}


def field_docs(cls: type) -> list[tuple[str, str, str]]:
    """(name, default, doc) of each field of a config dataclass, the doc read from the string literal under
    the field in its source (the house style), for `hearth train STAGE --help`."""
    docs: dict[str, str] = {}
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError, SyntaxError):
        tree = None
    if tree is not None:
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                is_doc = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant) \
                    and isinstance(after.value.value, str)
                docs[node.target.id] = " ".join(after.value.value.split()) if is_doc else ""
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = _yaml_value(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = _yaml_value(f.default_factory())
        else:
            default = "(required)"
        out.append((f.name, default, docs.get(f.name) or COMMON_FIELD_DOCS.get(f.name, "")))
    return out


def _yaml_value(value: Any) -> str:
    """A default as it would be written in a recipe (`null`, `[q_proj, v_proj]`, `0.0002`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("...").strip()  # a scalar document ends with an explicit "..."


def warmup_count(warmup_steps: float, total: int) -> int:
    """Warmup steps as every stage reads `warmup_steps`: below 1 a fraction of the run (rounded up), else a count."""
    return math.ceil(warmup_steps * total) if warmup_steps < 1 else int(warmup_steps)


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
    """Create `final` by filling a temp dir beside it and renaming it in (runtime.fileio.staged); a failure
    leaves no trace, and the temps of a killed writer are removed by the next one."""
    final = Path(final)
    with staged(final, is_dir=True) as tmp:
        fill(tmp)
    return final


# ----------------------------------------------------------------------------- run folders


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    """What the stage saved with it (epoch, data position, rng seeds, best loss ...)."""


def remove_dead_temps(folder: Path) -> None:
    """Every temp in `folder` (runtime.fileio names them `.NAME.tmp-...` for their owner process) whose owner
    is dead is removed; those of live processes, and unmarked ones, stay."""
    try:
        names = {e.name[1:e.name.index(TMP_MARK)] for e in os.scandir(folder)
                 if e.name.startswith(".") and TMP_MARK in e.name[1:]}
    except OSError:
        return
    for name in sorted(names):
        if name:
            remove_stale_temps(folder / name)


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
        remove_dead_temps(self.out)  # leftovers of a killed run; a live run's temps in the same folder stay
        remove_dead_temps(self.checkpoints)

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
    tokenizer and `hearth.json` are staged in a temp folder, then each renamed over its old copy; files of
    the previous final model that the new one lacks (a stale shard) go last. `hearth.json` is renamed in
    last of all, so a manifest always describes complete weights."""
    out = Path(out)
    keep = {"checkpoints", "metrics.jsonl", "loss.png"}
    tmp = make_temp(out / "final", is_dir=True)
    try:
        fill(tmp)
        write_manifest(tmp, manifest)
        new = {p.name for p in tmp.iterdir()}
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest while the weights are half replaced
        for name in sorted(new, key=lambda n: n == MANIFEST_NAME):
            p = tmp / name
            if p.is_dir():
                p.chmod(0o755)
                for f in p.rglob("*"):
                    f.chmod(0o755 if f.is_dir() else 0o644)
                commit_dir(p, out / name)  # a folder (adapter/) is swapped in whole
            else:
                p.chmod(0o644)
                os.replace(p, out / name)
        for p in out.iterdir():
            if p.name not in keep | new and not p.name.startswith("."):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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


def plot_panels(keys: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """(y-axis label, keys) per panel, read from the metric names: every `*loss*` key shares one panel
    labelled "loss"; any other metric (reward, kl, ...) gets its own panel labelled with its name."""
    losses = [k for k in keys if "loss" in k]
    panels = [("loss", losses)] if losses else []
    return panels + [(k, [k]) for k in keys if "loss" not in k]


def plot_metrics(metrics: str | os.PathLike, png: str | os.PathLike, keys: tuple[str, ...] = ("loss", "eval_loss"),
                 title: str = "") -> Path | None:
    """Metric curves against step (panels as plot_panels), written atomically; None if nothing to plot."""
    records = _read_jsonl(Path(metrics))
    series = {k: [(r["step"], r[k]) for r in records if k in r and "step" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = plot_panels(tuple(series))
    fig = Figure(figsize=(6, 1.0 + 2.5 * len(panels)), dpi=110)
    FigureCanvasAgg(fig)
    for i, (label, names) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for k in names:
            pts = series[k]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 40 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend()
        if i == 0 and title:
            ax.set_title(title)
        if i == len(panels) - 1:
            ax.set_xlabel("step")
    fig.tight_layout()
    png = Path(png)
    with staged(png) as tmp:
        fig.savefig(tmp, format="png")
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
