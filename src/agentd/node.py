"""One node: every service of an agentd process, built once and started in order.

``open_node`` is the composition root::

    async with open_node(settings) as node:
        await node.runtime.invoke("echo", {"text": "hi"})

builds the node's services from its settings (metrics, tracing, the deadline policy,
inference, generation, tools and the agent runtime over them), starts them in that order
and closes them in the reverse order when the block ends. A service that fails to start
closes the ones already started, in reverse order, and the error is raised from
``open_node`` (the gateway reports it as ``lifespan.startup.failed``).

:class:`Node` can also be built first and started later (``await node.start()`` /
``await node.aclose()``, or ``async with node``): the gateway builds its routes over a node
before its ASGI lifespan starts it. The node knows no protocol; the gateway serves it and
owns its readiness (``agentd.gateway.health``).

``build_inference``, ``build_generation``, ``build_runtime`` and ``build_registry`` build
one service each, for a caller that needs only that one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType

from agentd.agents import AgentRegistry
from agentd.agents.builtin import BUILTIN_AGENTS
from agentd.deadlines import DeadlinePolicy
from agentd.generate.service import GenerationService
from agentd.inference import InferenceService, ModelRepository
from agentd.models.catalog import ModelCatalog, builtin_models_dir
from agentd.observability import Metrics, Tracing
from agentd.observability.generation_metrics import GenerationMetrics
from agentd.runtime import (
    ActorHost,
    MemoryStateStore,
    Runtime,
    SQLiteStateStore,
    StateStore,
    WorkerPool,
)
from agentd.settings import Settings
from agentd.tools.factory import open_tool_service
from agentd.tools.service import ToolService

__all__ = [
    "Node",
    "build_catalog",
    "build_generation",
    "build_inference",
    "build_registry",
    "build_runtime",
    "deadline_policy",
    "open_node",
]

log = logging.getLogger(__name__)


class Node:
    """Every service of one node. Built, it has started nothing (no threads, files or
    models); :meth:`start` starts them, :meth:`aclose` closes them."""

    def __init__(self, settings: Settings, *, registry: AgentRegistry | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.tracing = Tracing(settings.service_name, settings.otlp_endpoint)
        try:
            # One deadline rule, applied by the services; the adapters only convert.
            self.deadlines = deadline_policy(settings)
            self.registry = registry if registry is not None else build_registry(settings)
            # One catalogue of model folders: each config.yaml is read once, for both.
            self.models = build_catalog(settings)
            self.inference = build_inference(settings, self.metrics, self.models)
            self.generation = build_generation(settings, self.metrics, self.models)
            self.tools = open_tool_service(settings, self.metrics)
            self.runtime = build_runtime(
                settings,
                self.registry,
                self.inference,
                self.metrics,
                self.generation,
                self.tools,
            )
            self.metrics.watch_runtime(self.runtime.host.gauges)
        except BaseException:
            self.tracing.aclose()  # its exporter thread, when tracing is on
            raise
        self._stack: AsyncExitStack | None = None
        self._started = False

    @property
    def started(self) -> bool:
        """Whether :meth:`start` succeeded (and :meth:`aclose` has not run since)."""
        return self._started

    async def start(self) -> None:
        """Start the services in order: inference, generation, tools, runtime.

        A service that raises closes every service started before it (and itself, which
        may have started in part), in reverse order, and the error propagates. Starts once.
        """
        if self._stack is not None:
            raise RuntimeError("the node was started already")
        async with AsyncExitStack() as stack:
            stack.callback(self.tracing.aclose)
            for service in (self.inference, self.generation, self.tools, self.runtime):
                # Its close first: a start that fails half-way leaves some of it to close.
                stack.push_async_callback(service.aclose)
                await service.start()
            self._stack = stack.pop_all()
        self._started = True
        # Everything built so far (modules, models, the app) lives as long as the process:
        # take it out of the cyclic collector's full passes.
        gc.collect()
        gc.freeze()

    async def aclose(self) -> None:
        """Close what :meth:`start` started, in reverse order (runtime first). Idempotent;
        a node never started closes its tracing only."""
        self._started = False
        stack, self._stack = self._stack, None
        if stack is None:
            self.tracing.aclose()
            return
        await stack.aclose()
        log.info("node stopped")

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


@asynccontextmanager
async def open_node(
    settings: Settings, *, registry: AgentRegistry | None = None
) -> AsyncIterator[Node]:
    """Build the node of ``settings`` and start it; closed when the block ends.

    ``registry`` replaces the agent types found from settings (built-ins and
    ``plugins/agents``). A failed start closes what had started and raises.
    """
    async with Node(settings, registry=registry) as node:
        yield node


def deadline_policy(settings: Settings) -> DeadlinePolicy:
    """The node's deadline rule from its settings (see agentd.deadlines)."""
    return DeadlinePolicy(settings.default_timeout_s, settings.max_timeout_s)


def build_registry(settings: Settings) -> AgentRegistry:
    """The built-in agent types and those under ``plugins/agents``."""
    registry = AgentRegistry()
    for agent_type in BUILTIN_AGENTS:
        registry.register(agent_type)
    registry.load_directory(settings.plugins / "agents")
    return registry


def build_catalog(settings: Settings) -> ModelCatalog:
    """The model folders: the built-in models, then ``plugins/models`` (which override)."""
    return ModelCatalog([builtin_models_dir(), settings.plugins / "models"])


def build_inference(
    settings: Settings, metrics: Metrics, catalog: ModelCatalog | None = None
) -> InferenceService:
    """The inference service over the tensor models of ``catalog`` (default: the
    settings' own)."""
    from agentd import __version__
    from agentd.inference.onnx_runtime import OnnxLoader, SessionFactory

    sessions = SessionFactory(
        threads=settings.inference_threads, providers=settings.execution_providers or None
    )
    repository = ModelRepository([OnnxLoader(sessions)], catalog or build_catalog(settings))
    return InferenceService(
        repository,
        threads=settings.inference_threads,
        observer=metrics,
        server_version=__version__,
        deadlines=deadline_policy(settings),
    )


def build_generation(
    settings: Settings, metrics: Metrics, catalog: ModelCatalog | None = None
) -> GenerationService:
    """Language models (``kind: language-model`` folders of ``catalog``, default: the
    settings' own) for the OpenAI API and ctx.generate: the built-in tinylm and any under
    ``plugins/models``."""
    observer = GenerationMetrics(metrics.registry)
    service = GenerationService(
        catalog or build_catalog(settings),
        threads=settings.inference_threads,
        providers=settings.execution_providers or None,
        observer=observer,
        deadlines=deadline_policy(settings),
    )
    observer.watch(service.gauges)
    return service


def build_runtime(
    settings: Settings,
    registry: AgentRegistry,
    inference: InferenceService,
    metrics: Metrics,
    generation: GenerationService | None = None,
    tools: ToolService | None = None,
) -> Runtime:
    """Virtual actors over a worker pool, state in SQLite (or memory) as configured."""
    store: StateStore
    if settings.state_store == "sqlite":
        store = SQLiteStateStore(settings.state_path)
    else:
        store = MemoryStateStore()
    host = ActorHost(
        registry,
        store,
        pool=WorkerPool(settings.workers, settings.max_queued_turns),
        inference=inference,
        generation=generation,
        tools=tools,
        observer=metrics,
        idle_seconds=settings.idle_seconds,
        max_mailbox=settings.max_mailbox,
        max_active=settings.max_agent_instances,
        deadlines=deadline_policy(settings),
    )
    return Runtime(host)
