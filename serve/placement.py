"""Will the deployments of a models.yaml fit the Ray cluster? Checked before deploying, so that a cluster
too small for them is one clear error instead of replicas that wait to be scheduled with no end.

    problem = check_fits(config, ray.nodes(), ray.available_resources())   # None when every replica fits

Each replica asks Ray for its deployment's `num_cpus` and `num_gpus` (models.yaml), on one node. The
check packs the replicas that must start (`replicas`, or `autoscaling.min_replicas`) onto the alive
nodes, largest first, and also against what the whole cluster has free now; the message says what is
needed, what the cluster has, and which setting to change. Replicas that autoscaling may add later are
only reported (`headroom`): the cluster may grow by then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .config import ServeConfig

EPS = 1e-9


@dataclass(frozen=True)
class Demand:
    """The replicas of one deployment and what each asks for."""

    deployment: str
    replicas: int
    cpus: float
    gpus: float
    max_replicas: int


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def demands(config: ServeConfig) -> list[Demand]:
    out = []
    for m in config.models:
        a = m.autoscaling
        start = a.min_replicas if a is not None else m.replicas
        out.append(Demand(f"chat-{_slug(m.name)}", start, float(m.num_cpus), float(m.num_gpus),
                          a.max_replicas if a is not None else m.replicas))
    for e in config.embeddings:
        out.append(Demand(f"embed-{_slug(e.name)}", e.replicas, float(e.num_cpus), float(e.num_gpus), e.replicas))
    return out


def alive_nodes(nodes: Iterable[dict[str, Any]]) -> list[dict[str, float]]:
    """CPU and GPU of each alive node, from `ray.nodes()`."""
    return [{"CPU": float(n.get("Resources", {}).get("CPU", 0)), "GPU": float(n.get("Resources", {}).get("GPU", 0))}
            for n in nodes if n.get("Alive", n.get("alive", False))]


def pack(wanted: list[Demand], nodes: list[dict[str, float]]) -> tuple[dict[str, list[int]], list[str]]:
    """(deployment -> node index of each placed replica, deployments with a replica that fits nowhere):
    first fit, replicas that ask for the most first."""
    free = [dict(n) for n in nodes]
    placed: dict[str, list[int]] = {d.deployment: [] for d in wanted}
    missing: list[str] = []
    order = sorted(((d, i) for d in wanted for i in range(d.replicas)), key=lambda x: (-x[0].gpus, -x[0].cpus))
    for d, _ in order:
        for k, f in enumerate(free):
            if f["CPU"] + EPS >= d.cpus and f["GPU"] + EPS >= d.gpus:
                f["CPU"] -= d.cpus
                f["GPU"] -= d.gpus
                placed[d.deployment].append(k)
                break
        else:
            if d.deployment not in missing:
                missing.append(d.deployment)
    return placed, missing


def _num(x: float) -> str:
    return f"{x:g}"


def _asks(d: Demand, n: int | None = None) -> str:
    n = d.replicas if n is None else n
    gpu = f" + {_num(d.gpus)} GPU" if d.gpus else ""
    return f"{d.deployment}: {n} x {_num(d.cpus)} CPU{gpu}"


def check_fits(config: ServeConfig, nodes: Iterable[dict[str, Any]], available: dict[str, float] | None = None
               ) -> str | None:
    """None when every replica that must start fits the cluster, else one message naming the shortfall."""
    wanted = [d for d in demands(config) if d.replicas > 0]
    alive = alive_nodes(nodes)
    need_cpu = sum(d.replicas * d.cpus for d in wanted)
    need_gpu = sum(d.replicas * d.gpus for d in wanted)
    has_cpu = sum(n["CPU"] for n in alive)
    has_gpu = sum(n["GPU"] for n in alive)
    per_node = ", ".join(f"{_num(n['CPU'])} CPU" + (f" + {_num(n['GPU'])} GPU" if n["GPU"] else "") for n in alive)
    _, missing = pack(wanted, alive)
    short = ""
    if not missing and available is not None:
        free_cpu, free_gpu = float(available.get("CPU", 0)), float(available.get("GPU", 0))
        if need_cpu > free_cpu + EPS or need_gpu > free_gpu + EPS:
            short = (f"; other work holds part of it: {_num(free_cpu)} CPU and {_num(free_gpu)} GPU are free now")
    if not missing and not short:
        return None
    what = "; ".join(_asks(d) for d in wanted)
    lacking = f"; no node can take a replica of {', '.join(missing)}" if missing else ""
    gpu_hint = " num_gpus: 0 for a CPU-only cluster," if need_gpu and not has_gpu else ""
    return (f"the Ray cluster cannot hold these deployments ({what}: {_num(need_cpu)} CPU and {_num(need_gpu)} "
            f"GPU in all); it has {_num(has_cpu)} CPU and {_num(has_gpu)} GPU on {len(alive)} node(s) "
            f"({per_node or 'none alive'}){short}{lacking}. Lower num_cpus / num_gpus or replicas in models.yaml "
            f"(fractions are allowed, e.g. num_cpus: 0.5;{gpu_hint} embeddings take num_cpus too), or add nodes")


def headroom(config: ServeConfig, nodes: Iterable[dict[str, Any]]) -> str | None:
    """A note when autoscaling's max_replicas cannot all fit the cluster as it is now."""
    full = [Demand(d.deployment, d.max_replicas, d.cpus, d.gpus, d.max_replicas) for d in demands(config)]
    if all(d.max_replicas == d.replicas for d in demands(config)):
        return None
    _, missing = pack(full, alive_nodes(nodes))
    if not missing:
        return None
    return (f"autoscaling of {', '.join(missing)} up to max_replicas does not fit the cluster as it is now: "
            "replicas beyond what fits wait until nodes join")


def describe(config: ServeConfig, nodes: Iterable[dict[str, Any]]) -> str:
    """Where each replica that must start would go (node numbers in `ray.nodes()` order)."""
    wanted = demands(config)
    placed, missing = pack(wanted, alive_nodes(nodes))
    lines = [f"{_asks(d)} -> node(s) {', '.join(str(k) for k in placed[d.deployment]) or '-'}" for d in wanted]
    if missing:
        lines.append(f"does not fit: {', '.join(missing)}")
    return "\n".join(lines)
