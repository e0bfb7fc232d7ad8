"""Small random Llama checkpoints and engines over them, for tests and benchmarks.

Needs the ``onnx`` and ``safetensors`` packages (dev extras).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agentd.generate.engine import EngineObserver, TokenEngine
from agentd.generate.onnx_lm import engine_for_session, graph_shape, open_session

__all__ = ["build_engine", "write_random_llama"]


def write_random_llama(
    folder: Path,
    *,
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    intermediate: int = 64,
    context: int = 256,
    seed: int = 0,
) -> Path:
    """An HF-format Llama folder (config.json + model.safetensors) with random weights."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    tensors = {"model.embed_tokens.weight": weight(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": 1 + weight(hidden) * 0.1,
            p + "post_attention_layernorm.weight": 1 + weight(hidden) * 0.1,
            p + "self_attn.q_proj.weight": weight(hidden, hidden),
            p + "self_attn.k_proj.weight": weight(hidden, hidden),
            p + "self_attn.v_proj.weight": weight(hidden, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, hidden),
            p + "mlp.gate_proj.weight": weight(intermediate, hidden),
            p + "mlp.up_proj.weight": weight(intermediate, hidden),
            p + "mlp.down_proj.weight": weight(hidden, intermediate),
        }
    tensors["model.norm.weight"] = 1 + weight(hidden) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "max_position_embeddings": context,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def build_engine(
    onnx_path: Path,
    *,
    blocks: int,
    block_size: int,
    max_batch: int = 64,
    eos: tuple[int, ...] = (1,),
    observer: EngineObserver | None = None,
    threads: int = 1,
    lanes: int = 1,
) -> TokenEngine:
    """A TokenEngine over a paged graph written by ``agentd.generate.onnx_export``."""
    return engine_for_session(
        open_session(onnx_path, threads=threads),
        name="test-lm",
        eos_token_ids=eos,
        blocks=blocks,
        block_size=block_size,
        max_batch=max_batch,
        lanes=lanes,
        observer=observer,
    )


def paged_decode(
    onnx_path: Path,
    prompt: list[int],
    steps: int,
    *,
    forced: list[int] | None = None,
    block_size: int = 16,
    session=None,
) -> tuple[list[int], list[float]]:
    """Decode with the paged graph and a block pool, one sequence, no engine around it.

    Greedy unless ``forced`` is given: then the true next tokens are fed whatever the
    graph picked (teacher forcing), to count how often its picks agree with a reference.
    Returns the picks and the seconds each decode step took (prefill not included). Pass
    an open ``session`` to reuse it (timings then skip onnxruntime's first-run set-up).
    """
    import time

    session = session or open_session(onnx_path, threads=2)
    total = len(prompt) + steps
    engine = engine_for_session(
        session,
        name="check",
        eos_token_ids=(),
        blocks=-(-total // block_size) + 1,
        block_size=block_size,
    )
    pool = engine.pool
    blocks = np.asarray(pool.borrow(pool.total), dtype=np.int64)
    picks: list[int] = []
    gaps: list[float] = []
    tokens = list(prompt)
    start = 0
    for step in range(steps):
        started = time.perf_counter()
        positions = np.arange(start, len(tokens), dtype=np.int64)
        logits, new_k, new_v = engine.forward(
            np.asarray(tokens[start:], dtype=np.int64)[None, :],
            positions[None, :],
            np.array([start], np.int64),
            blocks[None, : pool.blocks_for(start)],
        )
        pool.write(
            blocks[positions // block_size], positions % block_size, new_k[:, 0], new_v[:, 0]
        )
        picks.append(int(logits[0].argmax()))
        if step:  # the first run is the prefill
            gaps.append(time.perf_counter() - started)
        start = len(tokens)
        tokens.append(forced[step] if forced is not None else picks[-1])
    return picks, gaps


def dense_greedy(
    dense_path: Path, prompt: list[int], steps: int, *, session=None
) -> tuple[list[int], list[float]]:
    """Greedy decoding with the dense graph, its cache grown by concatenation every token
    (the reference for the engine and the baseline of ``agentd bench generate``).

    Returns the tokens and the seconds each decode step took; ``session`` as in
    :func:`paged_decode`.
    """
    import time

    session = session or open_session(dense_path, threads=2, layout="dense")
    meta = graph_shape(session)
    empty = np.zeros((meta["layers"], 1, 0, meta["kv_heads"], meta["head_dim"]), np.float32)
    logits, past_k, past_v = session.run(
        None,
        {
            "input_ids": np.array([prompt]),
            "positions": np.arange(len(prompt))[None],
            "past_len": np.array([0]),
            "past_k": empty,
            "past_v": empty,
        },
    )
    tokens: list[int] = []
    gaps: list[float] = []
    for _ in range(steps):
        started = time.perf_counter()
        tokens.append(int(logits[0].argmax()))
        position = past_k.shape[2]
        logits, new_k, new_v = session.run(
            None,
            {
                "input_ids": np.array([[tokens[-1]]]),
                "positions": np.array([[position]]),
                "past_len": np.array([position]),
                "past_k": past_k,
                "past_v": past_v,
            },
        )
        past_k = np.concatenate([past_k, new_k], axis=2)
        past_v = np.concatenate([past_v, new_v], axis=2)
        gaps.append(time.perf_counter() - started)
    return tokens, gaps
