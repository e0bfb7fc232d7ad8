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

:class:`NodeOptions` changes what a node builds beyond its settings: the actor host's class
and extra options (``agentd swarm`` runs its ``SwarmHost`` with its own turn observer), and
which optional parts it leaves out (the swarm keeps no metrics and starts no language
models and no tools)::

    options = NodeOptions(host_type=SwarmHost, host_options={"observe_every": 8},
                          metrics=False, generation=False, tools=False)
    async with open_node(settings, registry=registry, options=options) as node: ...

``build_inference``, ``build_generation``, ``build_runtime`` and ``build_registry`` build
one service each, for a caller that needs only that one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agentd.agents import AgentRegistry
from agentd.agents.builtin import BUILTIN_AGENTS
from agentd.deadlines import DeadlinePolicy
from agentd.generate.service import GenerationService
from agentd.inference import InferenceService, ModelRepository
from agentd.models.catalog import ModelCatalog, builtin_models_dir
from agentd.observability import Metrics, Tracing
from agentd.observability.generation_metrics import GenerationMetrics
from agentd.observability.spans import Spans
from agentd.runtime import (
    ActorHost,
    MemoryStateStore,
    Runtime,
    SQLiteStateStore,
    StateStore,
    WorkerPool,
)
from agentd.settings import Settings

if TYPE_CHECKING:
    from agentd.cluster.service import ClusterService
    from agentd.plugins.manager import PluginManager
    from agentd.tools.service import ToolService

__all__ = [
    "Node",
    "NodeOptions",
    "build_catalog",
    "build_cluster",
    "build_generation",
    "build_inference",
    "build_plugins",
    "build_registry",
    "build_runtime",
    "deadline_policy",
    "open_node",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeOptions:
    """What a node builds beyond its settings (the default: everything, as ``agentd serve``).

    ``host_type``: the actor host's class, :class:`ActorHost` or a subclass (the swarm's
    ``SwarmHost``). ``host_options``: more keyword arguments for it, which win over those
    the node derives from its settings (``observer``, ``observe_every``, ``freeze_every``,
    ``max_mailbox``, ...). ``generation`` / ``tools``: False leaves that service out: it is
    neither built nor started (no language model loads, no WebAssembly component), the
    node's attribute is None, and agents get the error of a host without it.
    ``metrics``: False builds no metrics registry (``node.metrics`` None) and the services
    report to none: every model call is one histogram observation otherwise, about 5% of
    the swarm's time. The language models need the registry (their gauges live there).
    ``reload``: watch the plugin folder and reload changed agent plugins live (when
    ``settings.reload`` allows and the folder exists); None (the default): on when the node
    builds its agent registry from its settings (``agentd serve``), off when the caller
    brings its own (the swarm, tests), which it manages itself.
    """

    host_type: type[ActorHost] = ActorHost
    host_options: Mapping[str, Any] = field(default_factory=dict)
    metrics: bool = True
    generation: bool = True
    tools: bool = True
    reload: bool | None = None

    def __post_init__(self) -> None:
        if self.generation and not self.metrics:
            raise ValueError("a node with language models needs its metrics: leave out both")


class Node:
    """Every service of one node. Built, it has started nothing (no threads, files or
    models); :meth:`start` starts them, :meth:`aclose` closes them. ``metrics``,
    ``generation`` and ``tools`` are None when ``options`` left them out."""

    metrics: Metrics | None
    generation: GenerationService | None
    tools: ToolService | None
    cluster: ClusterService | None
    plugins: PluginManager | None

    def __init__(
        self,
        settings: Settings,
        *,
        registry: AgentRegistry | None = None,
        options: NodeOptions | None = None,
    ) -> None:
        options = options or NodeOptions()
        self.settings = settings
        self.metrics = Metrics() if options.metrics else None
        self.tracing = Tracing.from_settings(settings)
        if self.metrics is not None:  # target_info: the resource the spans carry
            self.metrics.describe_target(self.tracing.config.resource)
        # The spans below the gateway (turns, inference, generation, tools, commits): the
        # services hold None while tracing is off (one check per call).
        self.spans = Spans(self.tracing.tracer) if self.tracing.enabled else None
        try:
            # One deadline rule, applied by the services; the adapters only convert.
            self.deadlines = deadline_policy(settings)
            self.registry = registry if registry is not None else build_registry(settings)
            # One catalogue of model folders: each config.yaml is read once, for both.
            self.models = build_catalog(settings)
            self.inference = build_inference(
                settings, self.metrics, self.models, deadlines=self.deadlines
            )
            self.inference.spans = self.spans  # before start(): its batchers take it
            self.generation = None
            if options.generation:
                assert self.metrics is not None  # NodeOptions refuses generation without it
                self.generation = build_generation(
                    settings, self.metrics, self.models, deadlines=self.deadlines
                )
                self.generation.spans = self.spans
            self.tools = None
            if options.tools:
                from agentd.tools.factory import open_tool_service  # not loaded without tools

                self.tools = open_tool_service(settings, self.metrics)
                self.tools.spans = self.spans
            # Agents owned by other nodes (peers or etcd set) go through the cluster.
            self.cluster = build_cluster(settings, self.metrics, self.tracing)
            host_options = dict(options.host_options)
            host_options.setdefault("deadlines", self.deadlines)  # one policy, shared
            host_options.setdefault("spans", self.spans)
            if self.cluster is not None:
                host_options.setdefault("forwarder", self.cluster.forwarder)
            self.runtime = build_runtime(
                settings,
                self.registry,
                self.inference,
                self.metrics,
                self.generation,
                self.tools,
                host_type=options.host_type,
                host_options=host_options,
            )
            if self.cluster is not None:
                self.cluster.attach(self.runtime.host)
                if settings.state_store == "redis":
                    # Writes the store refuses as a stale owner's count as fenced writes.
                    self.runtime.host.store.observer = self.cluster.observer  # type: ignore[attr-defined]
            if self.metrics is not None:
                self.metrics.watch_runtime(self.runtime.host.gauges)
            reload = options.reload if options.reload is not None else registry is None
            self.plugins = (
                build_plugins(self)
                if reload
                and settings.reload
                and (settings.plugins.is_dir() or settings.config is not None)
                else None
            )
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
        """Start the services in order: inference, generation, tools, runtime (those built).

        A service that raises closes every service started before it (and itself, which
        may have started in part), in reverse order, and the error propagates. Starts once.
        """
        if self._stack is not None:
            raise RuntimeError("the node was started already")
        async with AsyncExitStack() as stack:
            stack.callback(self.tracing.aclose)
            services = (
                self.metrics,  # GC pause and loop lag samplers
                self.inference,
                self.generation,
                self.tools,
                self.runtime,
                self.cluster,
                self.plugins,  # reloads once the runtime serves
            )
            for service in services:
                if service is None:  # left out by the node's options
                    continue
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
    settings: Settings,
    *,
    registry: AgentRegistry | None = None,
    options: NodeOptions | None = None,
) -> AsyncIterator[Node]:
    """Build the node of ``settings`` and start it; closed when the block ends.

    ``registry`` replaces the agent types found from settings (built-ins and
    ``plugins/agents``); ``options`` chooses the host and leaves services out (see
    :class:`NodeOptions`). A failed start closes what had started and raises.
    """
    async with Node(settings, registry=registry, options=options) as node:
        yield node


def deadline_policy(settings: Settings) -> DeadlinePolicy:
    """The node's deadline rule from its settings (see agentd.deadlines)."""
    return DeadlinePolicy(settings.default_timeout_s, settings.max_timeout_s)


def build_cluster(
    settings: Settings, metrics: Metrics | None, tracing: Tracing | None = None
) -> ClusterService | None:
    """The cluster service when ``settings`` name peers or etcd, else None (one node
    owns every agent)."""
    if not settings.peers and not settings.etcd:
        return None
    from agentd.cluster.service import ClusterService  # not loaded by a single node
    from agentd.observability.cluster_metrics import NO_METRICS, ClusterMetrics

    observer = ClusterMetrics(metrics.registry) if metrics is not None else NO_METRICS
    tracer = tracing.tracer if tracing is not None and tracing.enabled else None
    return ClusterService(settings, observer, tracer=tracer)


def build_registry(settings: Settings) -> AgentRegistry:
    """The built-in agent types and those under ``plugins/agents``."""
    registry = AgentRegistry()
    for agent_type in BUILTIN_AGENTS:
        registry.register(agent_type)
    registry.load_directory(settings.plugins / "agents")
    return registry


def build_plugins(node: Node) -> PluginManager:
    """The plugin manager of the node's ``settings.plugins``: a handler per kind of plugin
    reloads what changed into the node's services (agent types into its registry), each
    file verified first (MANIFEST and signature, docs/plugins.md)."""
    from agentd.observability.plugin_metrics import NO_METRICS, PluginMetrics
    from agentd.plugins import Verifier
    from agentd.plugins.agents import AgentPlugins
    from agentd.plugins.manager import PluginHandler, PluginManager

    settings = node.settings
    observer = PluginMetrics(node.metrics.registry) if node.metrics is not None else NO_METRICS
    verifier = Verifier.from_settings(settings)
    handlers: list[PluginHandler] = [
        AgentPlugins(
            node.registry,
            settings.plugins / "agents",
            check=verifier.check_bytes,
            observer=observer,
        )
    ]
    if node.tools is not None:
        from agentd.plugins.tools import ToolPlugins

        handlers.append(
            ToolPlugins.from_settings(
                node.tools, settings, check=verifier.check_bytes, observer=observer
            )
        )
    from agentd.plugins.models import ModelPlugins

    handlers.append(
        ModelPlugins(
            node.inference,
            node.generation,
            settings.plugins / "models",
            catalog=node.models,
            check=verifier.check_folder,
            observer=observer,
        )
    )
    if settings.config is not None:
        # The config file, wherever it lives (watched even without a plugin folder).
        from agentd.plugins.settings_reload import SettingsReload

        handlers.append(SettingsReload(node, observer=observer))
    return PluginManager(
        settings.plugins,
        handlers,
        debounce_ms=settings.reload_debounce_ms,
        config=settings.config,
    )


def build_catalog(settings: Settings) -> ModelCatalog:
    """The model folders: the built-in models, then ``plugins/models`` (which override)."""
    return ModelCatalog([builtin_models_dir(), settings.plugins / "models"])


def build_inference(
    settings: Settings,
    metrics: Metrics | None,
    catalog: ModelCatalog | None = None,
    *,
    deadlines: DeadlinePolicy | None = None,
) -> InferenceService:
    """The inference service over the tensor models of ``catalog`` (default: the
    settings' own), applying ``deadlines`` (default: a policy of its own from settings)."""
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
        deadlines=deadlines or deadline_policy(settings),
    )


def build_generation(
    settings: Settings,
    metrics: Metrics,
    catalog: ModelCatalog | None = None,
    *,
    deadlines: DeadlinePolicy | None = None,
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
        deadlines=deadlines or deadline_policy(settings),
    )
    observer.watch(service.gauges)
    return service


def build_runtime(
    settings: Settings,
    registry: AgentRegistry,
    inference: InferenceService,
    metrics: Metrics | None,
    generation: GenerationService | None = None,
    tools: ToolService | None = None,
    *,
    host_type: type[ActorHost] = ActorHost,
    host_options: Mapping[str, Any] | None = None,
) -> Runtime:
    """Virtual actors over a worker pool, state in SQLite, Redis or memory as configured.

    ``host_type`` is the host's class; ``host_options`` are more keyword arguments for it,
    which win over those taken from ``settings``."""
    store: StateStore
    if settings.state_store == "sqlite":
        store = SQLiteStateStore(settings.state_path)
    elif settings.state_store == "redis":
        # Imported here: redis-py is the optional cluster extra.
        from agentd.runtime.state.redis import RedisStateStore

        store = RedisStateStore(settings.redis_url or "")
    else:
        store = MemoryStateStore()
    options: dict[str, Any] = {
        "inference": inference,
        "generation": generation,
        "tools": tools,
        "observer": metrics,
        "idle_seconds": settings.idle_seconds,
        "max_mailbox": settings.max_mailbox,
        "max_active": settings.max_agent_instances,
        "deadlines": deadline_policy(settings),
    }
    options.update(host_options or {})
    pool = WorkerPool(settings.workers, settings.max_queued_turns)
    return Runtime(host_type(registry, store, pool=pool, **options))
