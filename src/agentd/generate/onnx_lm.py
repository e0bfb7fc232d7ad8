"""Load an ONNX language model (a paged-cache graph from onnx_export) into a TokenEngine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from agentd.errors import InvalidArgument
from agentd.generate.config import LMConfig
from agentd.generate.engine import EngineObserver, TokenEngine
from agentd.generate.kv_pool import TokenBlockPool
from agentd.generate.types import LMInfo

if TYPE_CHECKING:
    from agentd.inference.onnx_runtime import SessionFactory

__all__ = ["engine_for_session", "graph_shape", "load_onnx_lm", "open_session"]

_INPUTS = {
    "paged": {"input_ids", "positions", "past_len", "block_table", "k_cache", "v_cache"},
    "dense": {"input_ids", "positions", "past_len", "past_k", "past_v"},
}


def open_session(
    path: Path,
    *,
    threads: int = 2,
    providers: list[str] | None = None,
    layout: str = "paged",
    sessions: SessionFactory | None = None,
):
    """An onnxruntime session for a graph from onnx_export in ``layout`` (paged, or the dense
    baseline), made by ``sessions`` (default: a factory for ``providers``) with ``threads``
    intra-op threads; raises InvalidArgument for anything else."""
    from agentd.inference.onnx_runtime import SessionFactory

    factory = sessions or SessionFactory(threads=threads, providers=providers)
    session = factory.open(path, threads=threads)
    names = {i.name for i in session.get_inputs()}
    if names != _INPUTS[layout]:
        raise InvalidArgument(
            f"{path}: not a {layout}-cache language model graph (inputs {sorted(names)}; "
            "export one with python -m agentd.generate.onnx_export)"
        )
    return session


def graph_shape(session) -> dict:
    """The shape description onnx_export writes into the graph: layers, heads, kv_heads (the
    heads the cache holds: fewer than heads with grouped-query attention), head_dim,
    vocab_size, context_length."""
    try:
        shape = json.loads(session.get_modelmeta().description or "{}")
        # Graphs exported before grouped-query attention hold every head in the cache.
        shape.setdefault("kv_heads", shape.get("heads"))
        for key in ("layers", "heads", "kv_heads", "head_dim", "vocab_size", "context_length"):
            int(shape[key])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidArgument("the graph lacks its shape description (re-export it)") from None
    return shape


def engine_for_session(
    session,
    *,
    name: str,
    eos_token_ids: tuple[int, ...],
    blocks: int,
    block_size: int,
    max_batch: int = 64,
    lanes: int = 1,
    prefill_tokens: int = 256,
    context_length: int | None = None,
    observer: EngineObserver | None = None,
    prefix_cache: bool = True,
) -> TokenEngine:
    """A TokenEngine with a fresh block pool shaped for the session's graph."""
    shape = graph_shape(session)
    vocab, graph_context = shape["vocab_size"], shape["context_length"]
    pool = TokenBlockPool(
        layers=shape["layers"],
        blocks=blocks,
        block_size=block_size,
        heads=shape["kv_heads"],  # the cache holds only the kv heads
        head_dim=shape["head_dim"],
        prefix_cache=prefix_cache,
    )
    context = min(context_length or graph_context, graph_context)
    info = LMInfo(name, "onnxruntime", context, vocab, tuple(eos_token_ids))
    return TokenEngine(
        session,
        info,
        pool,
        max_batch=max_batch,
        lanes=lanes,
        prefill_tokens=prefill_tokens,
        observer=observer,
    )


def load_onnx_lm(
    config: LMConfig,
    *,
    threads: int = 2,
    providers: list[str] | None = None,
    observer: EngineObserver | None = None,
    sessions: SessionFactory | None = None,
) -> TokenEngine:
    """Blocking (builds the session); run it off the event loop.

    ``threads`` are shared among the engine's lanes: by default one single-threaded run per
    thread, which beats one run over an intra-op thread pool on a small model (the pool
    wakes its threads once per operator; see docs/generate.md for the measurement).
    """
    lanes = config.lanes or threads
    session = open_session(
        config.model_path,
        threads=max(1, threads // lanes),
        providers=providers,
        sessions=sessions,
    )
    return engine_for_session(
        session,
        name=config.name,
        eos_token_ids=config.eos_token_ids,
        blocks=config.cache_blocks,
        block_size=config.block_size,
        max_batch=config.max_batch,
        lanes=lanes,
        prefill_tokens=config.prefill_tokens,
        context_length=config.context_length,
        observer=observer,
        prefix_cache=config.prefix_cache,
    )
