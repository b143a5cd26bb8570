"""Ray Serve wiring: one deployment per chat model, one per embedding model, the agents deployment
(RAG + agent runs, holding handles to the chat deployments), and the FastAPI ingress that routes by
`model`. The only module of hearth that imports ray.

    hearth serve                          # embedded local Ray, 127.0.0.1:8000
    hearth serve --address auto           # join the Ray cluster this node belongs to

Each model deployment wraps a ModelService (an engine per replica); the ingress runs the same
FastAPI app as `--no-ray`, with deployment handles as its clients. Streams cross as Started/Chunk
objects; leaving a stream early cancels it on the replica, which aborts the engine request.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, AsyncIterator

import ray
from hearth.runtime.errors import CapacityError, EngineDeadError
from ray import serve
from ray.serve.config import HTTPOptions
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from .config import EmbeddingConfig, ModelConfig, ServeConfig
from .router import EmbeddingInfo, Router

log = logging.getLogger("hearth.serve")

APP_NAME = "hearth"
_HEALTH_PERIOD_S = 10.0
# Under Ray each streamed message crosses replica -> ingress -> proxy, ~5 ms of CPU per message on a
# small CPU (bench/RESULTS.md); batching tokens produced within this window keeps that off the engine.
RAY_STREAM_INTERVAL_MS = float(os.environ.get("HEARTH_RAY_STREAM_INTERVAL_MS", "40"))


@serve.deployment
class ChatModel:
    """One replica: one engine for one configured model."""

    def __init__(self, config: ModelConfig, chat_template: str | None):
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

    async def healthy(self) -> bool:
        return await self.svc.healthy()

    def check_health(self) -> None:
        """Ray Serve restarts a replica whose engine loop died."""
        if not self.svc.engine.healthy:
            raise RuntimeError(f"the engine of {self.svc.config.name} stopped")

    def __del__(self):
        svc = getattr(self, "svc", None)
        if svc is not None:
            svc.shutdown()


@serve.deployment
class EmbeddingModel:
    def __init__(self, config: EmbeddingConfig):
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

    async def generate(self, request, want_bytes: bool = False, echo_bytes: bool = False) -> AsyncIterator:
        gen = self.stream_handle.generate.remote(request, want_bytes, echo_bytes)
        finished = False
        try:
            async for item in gen:
                yield item
            finished = True
        except (BackPressureError, DeploymentUnavailableError) as e:
            raise CapacityError(f"the model's replicas are saturated ({type(e).__name__})") from None
        except ray.exceptions.RayActorError as e:
            raise EngineDeadError(f"the model replica died: {e}") from None
        finally:
            if not finished:
                gen.cancel()  # the replica's generator is cancelled, which aborts the engine request

    async def stats(self):
        return await self.handle.stats.remote()

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
        except (BackPressureError, DeploymentUnavailableError) as e:
            raise CapacityError(f"the embedding replicas are saturated ({type(e).__name__})") from None


@serve.deployment
class Agents:
    """RAG indexes and agent runs, composed with the chat deployments through their handles."""

    async def __init__(self, config: ServeConfig, chat: dict[str, Any]):
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
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
        return call

    async def run(self, req) -> AsyncIterator:
        gen = self.stream_handle.run.remote(req)
        finished = False
        try:
            async for event in gen:
                yield event
            finished = True
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        finally:
            if not finished:
                gen.cancel()


def _cause(e: BaseException) -> BaseException:
    """The exception the replica raised (APIError, HearthError ...), not Ray's wrapper of it."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


@serve.deployment
@serve.ingress()
class Ingress:
    """The FastAPI app of app.py, its clients being the model deployments' handles."""

    async def __init__(self, config: ServeConfig, chat: dict[str, Any], embeddings: dict[str, Any], agents=None):
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
        import asyncio

        self._hearth_app.state.draining = True
        end = time.monotonic() + timeout_s
        while self._hearth_app.state.in_flight > 0 and time.monotonic() < end:
            await asyncio.sleep(0.05)
        return self._hearth_app.state.in_flight


def build(config: ServeConfig):
    """The bound application graph for serve.run."""
    chat: dict[str, Any] = {}
    for m in config.models:
        opts: dict[str, Any] = {
            "name": f"chat-{_slug(m.name)}",
            "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
            # the engine queues and batches: let Ray hand it everything up to its own queue limit
            "max_ongoing_requests": m.max_num_seqs + m.max_queued_requests,
            "health_check_period_s": _HEALTH_PERIOD_S,
            "graceful_shutdown_timeout_s": config.drain_timeout_s,
        }
        if m.autoscaling is not None:
            a = m.autoscaling
            opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                          "target_ongoing_requests": a.target_ongoing_requests}
        else:
            opts["num_replicas"] = m.replicas
        chat[m.name] = ChatModel.options(**opts).bind(m, m.load_chat_template(config.base_dir))
    embeddings = {
        e.name: EmbeddingModel.options(
            name=f"embed-{_slug(e.name)}", num_replicas=e.replicas,
            ray_actor_options={"num_cpus": e.num_cpus, "num_gpus": e.num_gpus},
            max_ongoing_requests=256).bind(e)
        for e in config.embeddings}
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


def start(config: ServeConfig, address: str | None = None):
    """Start (or join) Ray and deploy; returns once every replica is up."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            need = sum(m.num_cpus * m.replicas for m in config.models) + sum(e.num_cpus for e in config.embeddings)
            ray.init(num_cpus=max(os.cpu_count() or 1, int(need + 0.999)), include_dashboard=False,
                     logging_level=logging.WARNING, configure_logging=False)
    # the proxy neither times out nor sheds requests: the app answers 408/429 in OpenAI's envelope
    serve.start(http_options=HTTPOptions(host=config.host, port=config.port, request_timeout_s=None))
    return serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)


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


def run(config: ServeConfig, address: str | None = None) -> int:
    """`hearth serve`: deploy, print the URL, block until SIGINT/SIGTERM, then drain and stop."""
    stop_event = threading.Event()

    def on_signal(signum, frame):
        stop_event.set()

    start(config, address)
    # after ray.init, which installs handlers of its own
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host = config.host if ":" not in config.host else f"[{config.host}]"
    print(f"hearth: serving on http://{host}:{config.port}/v1 (Ray Serve)", flush=True)
    stop_event.wait()
    print("hearth: draining and shutting down", flush=True)
    stop(config)
    return 0
