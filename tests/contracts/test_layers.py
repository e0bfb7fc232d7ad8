"""The layer map of docs/architecture.md, enforced on the source's imports.

Data flows one way: gateway -> node -> runtime -> inference | generate | tools. Lower layers
never import the gateway, the node or the command line; the agent SDK (agents/) never
imports the runtime; I/O and protocol libraries are imported only by the adapter modules
named below, so that the inner layers see plain Python objects and numpy arrays.
"""

from __future__ import annotations

import pytest

from tests.contracts.imports import SRC, Import, imports_of, source_files, within

# The outer ring: protocol edges and process entry points. Everything else is inner.
OUTER = ("agentd.gateway", "agentd.cli", "agentd.server", "agentd.testing", "agentd.__main__")
GENERATED = ("agentd.v1", "agentd.kserve")  # protobuf / connect stubs, used by the gateway

# library -> the inner modules allowed to import it (its adapters)
ADAPTERS: dict[str, tuple[str, ...]] = {
    "onnxruntime": (
        "agentd.inference.onnx_runtime",
        "agentd.generate.onnx_runner",
        "agentd.generate.onnx_export",
    ),
    "onnx": ("agentd.generate.onnx_export",),
    "wasmtime": ("agentd.tools.sandbox",),
    "sqlite3": ("agentd.runtime.state.sqlite",),
    "redis": ("agentd.runtime.state.redis",),
    "llama_cpp": ("agentd.generate.gguf_backend", "agentd.generate.gguf_engine"),
    "gguf": (
        "agentd.generate.gguf_export",
        "agentd.generate.gguf_backend",
        "agentd.generate.chat_template",
    ),
    "torch": ("agentd.generate.hf_backend", "agentd.inference.embedding_export"),
    "transformers": ("agentd.generate.hf_backend", "agentd.inference.embedding_export"),
    "prometheus_client": ("agentd.observability",),
    "aetcd": ("agentd.cluster.etcd",),
    "opentelemetry": ("agentd.observability",),
    "watchfiles": ("agentd.plugins.manager",),
    "cryptography": ("agentd.plugins.signing",),
    # protocol and server libraries: the outer ring only
    "grpc": (),
    "connectrpc": (),
    "google.protobuf": (),
    "pyvoy": (),
    "httpx": (),
    "typer": (),
    "rich": (),
    # benchmark-only dependencies stay out of the runtime package altogether
    "fastapi": (),
    "uvicorn": (),
    "matplotlib": (),
    "tritonclient": (),
}


def _all_imports() -> list[Import]:
    return [imp for path in source_files("agentd") for imp in imports_of(path)]


IMPORTS = _all_imports()


def _inner(module: str) -> bool:
    return not any(within(module, p) for p in (*OUTER, *GENERATED))


def _offending(rule) -> list[str]:
    return sorted(imp.where() for imp in IMPORTS if rule(imp))


def test_the_scan_sees_the_source() -> None:
    # A scan that read nothing would pass every rule below.
    modules = {imp.module for imp in IMPORTS}
    assert {"agentd.node", "agentd.agents.context", "agentd.gateway.app"} <= modules
    assert len(IMPORTS) > 500


def test_inner_layers_do_not_import_the_outer_ring() -> None:
    assert (
        _offending(
            lambda imp: (
                _inner(imp.module) and any(within(imp.target, p) for p in (*OUTER, *GENERATED))
            )
        )
        == []
    )


def test_only_the_gateway_and_entry_points_import_the_node() -> None:
    assert (
        _offending(
            lambda imp: (
                within(imp.target, "agentd.node")
                and _inner(imp.module)
                and not within(imp.module, "agentd.swarm")  # the swarm runs on a node too
                and imp.module != "agentd.node"
            )
        )
        == []
    )


def test_the_agent_sdk_does_not_import_the_runtime() -> None:
    forbidden = ("agentd.runtime", "agentd.node", "agentd.swarm", "agentd.inference")
    assert (
        _offending(
            lambda imp: (
                within(imp.module, "agentd.agents")
                and any(within(imp.target, p) for p in forbidden)
            )
        )
        == []
    )


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_io_libraries_only_in_their_adapters(library: str) -> None:
    allowed = ADAPTERS[library]
    assert (
        _offending(
            lambda imp: (
                _inner(imp.module)
                and within(imp.target, library)
                and not any(within(imp.module, a) for a in allowed)
            )
        )
        == []
    )


def test_nothing_in_the_runtime_package_imports_the_benchmarks() -> None:
    assert _offending(lambda imp: within(imp.target, "agentd_bench")) == []


@pytest.mark.parametrize("adapter", sorted({a for mods in ADAPTERS.values() for a in mods}))
def test_every_named_adapter_exists(adapter: str) -> None:
    # A renamed adapter must be renamed here too, or its library would be refused there.
    base = SRC.joinpath(*adapter.split("."))
    assert base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()
