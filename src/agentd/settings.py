"""Settings: flags > ``AGENTD_*`` environment > YAML file > defaults.

Read once at start and passed down; nothing reads them at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from agentd.errors import ConfigError, InvalidArgument

__all__ = ["Settings", "describe_settings_error", "load_settings", "reread_settings"]

CONFIG_ENV = "AGENTD_CONFIG"


class Settings(BaseSettings):
    """Everything configurable, with the defaults a newcomer gets."""

    model_config = SettingsConfigDict(env_prefix="AGENTD_", extra="forbid")

    config: Path | None = Field(None, description="YAML file these settings were read from")
    # The flags ``load_settings`` was given: a reload of the config file reads the settings
    # again with them (flags still win over the file). Set by load_settings, not the file.
    serve_flags: dict[str, Any] = Field(
        default_factory=dict, description="command-line flags the settings were read with"
    )
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = Field(None, description="require client certs signed by it")
    http3: bool = False
    plugins: Path = Path("plugins")
    reload: bool = Field(True, description="watch the plugin folder and reload what changes")
    reload_debounce_ms: int = Field(
        50, ge=1, le=10_000, description="quiet time after a plugin write before it reloads"
    )
    # Plugin verification (docs/plugins.md): each key a PEM file, a file holding the raw
    # 32-byte key in base64, or that base64 itself; checked when the settings are read.
    plugin_trusted_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="ed25519 public keys MANIFEST.sig may be made with"
    )
    require_signature: bool = Field(
        False, description="load no plugin without a MANIFEST signed by a trusted key"
    )
    etcd: str | None = Field(None, description="etcd URL (http://host:2379): join a cluster")

    # Cluster (docs/cluster.md). One process owns every agent unless ``processes`` > 1
    # (static placement among local processes) or ``etcd`` is set (placement in etcd).
    processes: int = Field(1, ge=1, le=64, description="node processes on this port")
    partitions: int = Field(1024, ge=1, le=65_536, description="agent partitions per cluster")
    cluster: str = Field(
        "agentd", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="cluster name"
    )
    node_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="this node's id in the cluster (default: host name and port)",
    )
    advertise: str | None = Field(
        None, description="HOST:PORT other nodes reach this node's peer listener at"
    )
    zone: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    lease_ttl_s: float = Field(5.0, ge=1.0, le=300.0, description="etcd lease of a node")
    status_interval_s: float = Field(1.0, gt=0, le=60.0, description="node status refresh")
    # Scaling (the coordinator's HPA-style rule, agentd.cluster.scaling; docs/cluster.md).
    min_nodes: int = Field(1, ge=1, le=10_000, description="fewest nodes a decision asks for")
    max_nodes: int = Field(10, ge=1, le=10_000, description="most nodes a decision asks for")
    target_utilization: float = Field(0.7, gt=0, le=1.0, description="target mean node load")
    queue_time_target_s: float = Field(0.5, gt=0, description="target mean turn queue time")
    kv_occupancy_target: float = Field(0.8, gt=0, le=1.0, description="target KV-cache use")
    scale_tolerance: float = Field(0.1, ge=0, lt=1.0, description="no change within ±this ratio")
    scale_down_stabilization_s: float = Field(
        300.0, ge=0, le=86_400, description="scale down to the window's highest recommendation"
    )
    max_scale_up_factor: float = Field(2.0, gt=1.0, le=100.0, description="growth per decision")
    scale_interval_s: float = Field(5.0, gt=0, le=3600.0, description="coordinator's period")
    # Set by the ``--processes`` supervisor for its children: this process's peer listener
    # (``unix:/path`` or ``tcp:host:port``) and every process's, as ``id=endpoint``.
    peer_listen: str | None = None
    peers: Annotated[list[str], NoDecode] = Field(default_factory=list)

    auth_tokens: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="accepted bearer tokens"
    )
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0)
    default_timeout_s: float | None = Field(
        60.0,
        gt=0,
        description="deadline of a turn, inference or generation whose caller sends none "
        "(told turns too); null: none",
    )
    max_timeout_s: float | None = Field(
        None, gt=0, description="longest deadline a caller may ask for; null: no cap"
    )
    grace_period_s: float = Field(10.0, ge=0, description="drain time on shutdown")
    max_connections: int = Field(
        10_000, gt=0, description="client connections on the port (kept under the fd limit)"
    )
    health_port: int | None = Field(
        None, ge=0, le=65535, description="a port serving only health checks, own reserve"
    )
    request_headers_timeout_s: float = Field(
        10.0, ge=0.001, description="time a client has to send a request's headers"
    )
    connection_idle_timeout_s: float = Field(
        300.0, ge=0.001, description="close a connection with no request this long"
    )
    stream_idle_timeout_s: float = Field(
        300.0, ge=0.001, description="reset a request with no bytes either way this long"
    )
    max_streams_per_connection: int = Field(
        1000, ge=1, le=2_147_483_647, description="concurrent HTTP/2 and HTTP/3 streams"
    )
    max_request_headers_kib: int = Field(60, ge=1, le=8192, description="request header bytes")
    max_request_headers: int = Field(100, ge=1, le=10_000, description="request header count")
    max_agent_instances: int = Field(1_000_000, gt=0, description="agents kept in memory")
    workers: int = Field(512, gt=0, description="worker tasks running agent turns")
    max_queued_turns: int = Field(65536, gt=0, description="run queue bound (backpressure)")
    max_mailbox: int = Field(10_000, gt=0, description="messages waiting per agent")
    idle_seconds: float = Field(300.0, gt=0, description="passivate agents idle this long")
    state_store: Literal["sqlite", "memory", "redis"] = "sqlite"
    redis_url: str | None = Field(None, description="redis://host:port/db for state_store redis")
    state_path: Path = Field(Path("state/agents.db"), description="SQLite file for agent state")

    inference_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1, gt=0, description="threads running models"
    )
    execution_providers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="ONNX Runtime providers; empty: best installed"
    )

    tools_cache_dir: Path = Field(
        default_factory=lambda: _cache_home() / "agentd" / "tools",
        description="compiled tool components, one folder per content hash",
    )
    tool_max_fuel: int = Field(5_000_000_000, gt=0, description="CPU budget per tool call")
    tool_max_memory_bytes: int = Field(128 * 1024 * 1024, gt=0, description="memory per call")
    tool_timeout_s: float = Field(5.0, gt=0, description="wall-clock deadline per tool call")
    tool_max_output_bytes: int = Field(1024 * 1024, gt=0, description="JSON result size limit")
    tool_max_input_bytes: int = Field(1024 * 1024, gt=0, description="JSON arguments size limit")
    tool_threads: int = Field(
        default_factory=lambda: max(4, 2 * (os.cpu_count() or 1)),
        gt=0,
        description="threads running tool calls",
    )
    max_queued_tool_calls: int = Field(4096, gt=0, description="tool calls waiting (backpressure)")
    tool_pool_size: int = Field(2, ge=0, description="sandbox instances prepared ahead of calls")
    tool_max_running_per_tool: int | None = Field(
        None, gt=0, description="calls of one tool running at once; default: half of tool_threads"
    )
    tool_max_queued_per_tool: int = Field(
        1024, gt=0, description="calls of one tool waiting (backpressure)"
    )
    tool_max_total_memory_bytes: int = Field(
        1024 * 1024 * 1024,
        gt=0,
        description="sandbox memory all running calls may reserve (each its per-call limit)",
    )

    otlp_endpoint: str | None = Field(
        None,
        description="OTLP endpoint (a base URL) for spans; wins over OTEL_EXPORTER_OTLP_ENDPOINT",
    )
    service_name: str | None = Field(
        None, description="service.name of the spans; default OTEL_SERVICE_NAME, else agentd"
    )
    log_level: str = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one object per line, with trace_id/span_id when traced"
    )
    envoy_log_level: Literal[
        "trace", "debug", "info", "warning", "warn", "error", "critical", "off"
    ] = Field("error", description="Envoy's log; credentials are redacted at every level")

    @field_validator("advertise")
    @classmethod
    def _check_advertise(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"advertise must be HOST:PORT (port 0-65535), not {value[:100]!r}")
        return value

    @field_validator("plugin_trusted_keys")
    @classmethod
    def _check_trusted_keys(cls, value: list[str]) -> list[str]:
        if value:
            from agentd.plugins.signing import read_public_key  # cryptography: only if used

            for index, spec in enumerate(value):
                try:
                    read_public_key(spec)
                except InvalidArgument as exc:
                    raise ValueError(f"key {index}: {exc.message}") from None
        return value

    @field_validator(
        "auth_tokens", "execution_providers", "peers", "plugin_trusted_keys", mode="before"
    )
    @classmethod
    def _split_tokens(cls, value: Any) -> Any:
        # AGENTD_AUTH_TOKENS=a,b is friendlier than a JSON list.
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @model_validator(mode="after")
    def _check_tls(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.http3 and self.tls_cert is None:
            raise ValueError("http3 needs TLS: give tls_cert and tls_key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs TLS: give tls_cert and tls_key")
        return self

    @model_validator(mode="after")
    def _check_state_store(self) -> Settings:
        if self.state_store == "redis" and not self.redis_url:
            raise ValueError("state_store redis needs redis_url (redis://host:port/db)")
        if self.processes > 1 and self.state_store == "memory":
            raise ValueError(
                "processes > 1 needs a shared state store (sqlite or redis), not memory"
            )
        return self

    @model_validator(mode="after")
    def _check_signature(self) -> Settings:
        if self.require_signature and not self.plugin_trusted_keys:
            raise ValueError("require_signature needs plugin_trusted_keys (ed25519 public keys)")
        return self

    @model_validator(mode="after")
    def _check_scaling(self) -> Settings:
        if self.min_nodes > self.max_nodes:
            raise ValueError(
                f"min_nodes ({self.min_nodes}) is larger than max_nodes ({self.max_nodes})"
            )
        return self

    @model_validator(mode="after")
    def _check_deadlines(self) -> Settings:
        if (
            self.default_timeout_s is not None
            and self.max_timeout_s is not None
            and self.default_timeout_s > self.max_timeout_s
        ):
            raise ValueError(
                f"default_timeout_s ({self.default_timeout_s:g}) is longer than max_timeout_s "
                f"({self.max_timeout_s:g}): a call without a deadline of its own would get "
                "more time than any caller may ask for"
            )
        return self

    @model_validator(mode="after")
    def _check_tool_memory(self) -> Settings:
        # Each running call reserves its limit from the budget: over it, no call could run.
        if self.tool_max_memory_bytes > self.tool_max_total_memory_bytes:
            raise ValueError(
                f"tool_max_memory_bytes ({self.tool_max_memory_bytes:,}) is larger than "
                f"tool_max_total_memory_bytes ({self.tool_max_total_memory_bytes:,}): "
                "no tool call could run; raise the budget or lower the per-call limit"
            )
        return self

    @model_validator(mode="after")
    def _check_tracing(self) -> Settings:
        # The OTEL_* variables are read here too, so that a bad one is a settings error
        # (one line, exit 2) and not a crash at the node's start or its first span.
        if self.otlp_endpoint or any(name.startswith("OTEL_") for name in os.environ):
            from agentd.observability.tracing import tracing_config

            tracing_config(self)
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlFileSource(settings_cls, init_settings)


class _YamlFileSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by the ``config`` flag or ``AGENTD_CONFIG``."""

    def __init__(self, settings_cls: type[BaseSettings], init: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self._init = init

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        path = self._init().get("config") or os.environ.get(CONFIG_ENV)
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read config file {path}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of settings")
        for key in data:
            if not isinstance(key, str):
                raise ValueError(f"config file {path}: setting names must be strings, not {key!r}")
        if "serve_flags" in data or "serve-flags" in data:
            raise ValueError(f"config file {path}: serve_flags is not a setting of the file")
        return {key.replace("-", "_"): value for key, value in data.items()}


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def load_settings(**flags: Any) -> Settings:
    """Build settings from flags (None means 'not given'), environment and config file.

    Raises :class:`~agentd.errors.ConfigError` with one line naming each bad field (and the
    ``AGENTD_*`` variable that set it) or the config file's problem; pydantic's
    ValidationError is its ``__cause__``.
    """
    given = {k: v for k, v in flags.items() if v is not None}
    try:
        return Settings(**given, serve_flags=_jsonable(given))
    except ValueError as exc:  # pydantic's ValidationError is a ValueError too
        raise ConfigError(describe_settings_error(exc)) from exc


def reread_settings(current: Settings) -> Settings:
    """The settings read again as :func:`load_settings` read ``current``: its flags, the
    environment and the config file (now). ConfigError as load_settings raises it."""
    return load_settings(**current.serve_flags)


def _jsonable(flags: dict[str, Any]) -> dict[str, Any]:
    # The settings travel to the server process as JSON: paths as strings.
    return {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}


def describe_settings_error(exc: ValueError) -> str:
    """One line for what the settings refused: each bad field with the variable that set it
    and the value it got, or the config file's problem. Every command prints this."""
    if isinstance(exc, ValidationError):
        return "; ".join(_describe(error) for error in exc.errors())
    return " ".join(str(exc).split())  # the config file: unreadable, not YAML, not a mapping


def _describe(error: Any) -> str:
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error.get("loc", ()))
    if not where:
        return message
    env: str | None = f"AGENTD_{where.upper()}"
    env = env if len(error["loc"]) == 1 and env in os.environ else None  # name it if set
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{where}{f' ({env})' if env else ''}: {message} (got {got})"
