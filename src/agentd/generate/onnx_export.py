"""Export a Llama-style HF checkpoint to ONNX graphs the token engine runs.

The graph is written op by op (no torch exporter), so it reads the same as the engine that
feeds it. Two cache layouts:

``paged`` (the engine's): the KV cache is a pool of fixed-size blocks, K and V each
  [heads, layers * blocks, block_size, head_dim] (head-major, so one sequence's blocks for
  one head gather into one matrix). Each sequence names its blocks in a ``block_table`` row;
  the graph gathers them, attends with one matmul per head and sequence, and returns only
  the new tokens' keys and values, which the engine writes into the pool in place.

``dense`` (the baseline it is measured against): the past keys and values come in as one
  contiguous [layers, batch, past, heads, head_dim] array that the caller grows by
  concatenation every token.

Both take ``input_ids`` and ``positions`` [batch, tokens] and ``past_len`` [batch] and
return ``logits`` [batch, vocab] for each row's highest position (its last real token; rows
may be right-padded with position 0) plus ``new_k``/``new_v``
[layers, batch, tokens, heads, head_dim].

    python -m agentd.generate.onnx_export models/tinylm/hf OUT_DIR [--int8] [--dense]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["build_model", "check_architecture", "export_onnx", "quantize_int8", "rope_inv_freq"]

_OPSET = 17
_NEG = -1.0e9  # added to masked scores; finite so a row never turns into NaN


class _Graph:
    """A small builder over onnx.helper: unique names, initializers from numpy."""

    def __init__(self) -> None:
        from onnx import helper, numpy_helper

        self._helper = helper
        self._numpy_helper = numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(self._numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        """A node with one output; returns its name."""
        return self.op_n(op_type, *inputs, outputs=1, **attrs)[0]

    def op_n(self, op_type: str, *inputs: str, outputs: int, **attrs: Any) -> list[str]:
        """A node with ``outputs`` outputs; returns their names."""
        self._count += 1
        names = [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        self.nodes.append(self._helper.make_node(op_type, list(inputs), names, **attrs))
        return names


def _load_hf(hf_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))
    return config, {k: v.astype(np.float32) for k, v in weights.items()}


_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: dict) -> dict:
    """The RoPE settings of an HF config, merged from where each transformers version puts
    them: ``rope_parameters`` (transformers 5) or ``rope_scaling`` plus a top-level
    ``rope_theta`` (earlier). Raises ValueError for a rope type this exporter lacks."""
    rope = {"rope_theta": config.get("rope_theta", 10000.0)}
    rope |= config.get("rope_scaling") or {}
    rope |= config.get("rope_parameters") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(
            f"rope_type {kind!r} is not supported (supported: {', '.join(_ROPE_TYPES)})"
        )
    if float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor other than 1 is not supported")
    return rope | {"rope_type": kind}


def rope_inv_freq(config: dict, head_dim: int) -> np.ndarray:
    """The rotary frequencies per pair of dimensions, as transformers computes them for the
    config's rope type (``_compute_default/linear/llama3_parameters``)."""
    rope = rope_parameters(config)
    theta = float(rope["rope_theta"])
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    kind = rope["rope_type"]
    if kind == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif kind == "llama3":
        factor = float(rope["factor"])
        low = float(rope["low_freq_factor"])
        high = float(rope["high_freq_factor"])
        old_context = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by ``factor``, short ones kept, the band between
        # blended smoothly (Llama 3.1's context extension).
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        inv_freq = np.where(medium, blended, scaled)
    return inv_freq


def _rope_tables(config: dict, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    positions = np.arange(config["max_position_embeddings"], dtype=np.float64)
    # Half-width tables: RotaryEmbedding (non-interleaved) applies each angle to both halves,
    # as transformers' rotate_half does.
    angles = np.outer(positions, rope_inv_freq(config, head_dim))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_architecture(config: dict) -> None:
    """Raise ValueError, naming the field, for a config this exporter cannot reproduce."""
    model_type = config.get("model_type", "llama")
    if model_type not in _MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(_MODEL_TYPES)})"
        )
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads ({kv_heads}) must divide num_attention_heads ({heads})"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {config['hidden_act']!r} is not supported (only silu)")
    rope_parameters(config)
    # Sliding-window attention (Mistral; Qwen2 when use_sliding_window) is not implemented:
    # a window at least as long as the context is plain attention, anything shorter refused.
    window = config.get("sliding_window")
    layer_types = config.get("layer_types") or []
    sliding = window is not None and (
        config.get("use_sliding_window", model_type != "qwen2")
        or "sliding_attention" in layer_types
    )
    if sliding and window is not None and int(window) < int(config["max_position_embeddings"]):
        raise ValueError(
            f"sliding_window {window} (shorter than max_position_embeddings "
            f"{config['max_position_embeddings']}) is not supported: sliding-window attention "
            "is not implemented by this exporter"
        )


_LAYER_WEIGHTS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    *(
        f"{module}.{kind}"
        for module in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
        for kind in ("weight", "bias")  # biases where present (Qwen2's q/k/v)
    ),
)


def _check_tensors(weights: dict[str, np.ndarray], layers: int) -> None:
    """Refuse tensors the graph would leave out (q/k norms, extra layers): ignoring them
    would export another model than the checkpoint's."""
    known = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    known |= {f"model.layers.{i}.{name}" for i in range(layers) for name in _LAYER_WEIGHTS}
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"tensors this exporter does not convert: {', '.join(unknown[:5])}")


def build_model(config: dict, weights: dict[str, np.ndarray], *, layout: str = "paged"):
    """The ONNX ModelProto for ``config``/``weights`` with the given cache layout."""
    from onnx import TensorProto, helper

    if layout not in ("paged", "dense"):
        raise ValueError(f"layout must be 'paged' or 'dense', not {layout!r}")
    check_architecture(config)
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = int(config.get("num_key_value_heads") or heads)
    group = heads // kv_heads  # query heads per kv head (grouped-query attention)
    hidden = config["hidden_size"]
    head_dim = int(config.get("head_dim") or hidden // heads)
    eps = float(config.get("rms_norm_eps", 1e-5))
    vocab = config["vocab_size"]

    _check_tensors(weights, layers)
    g = _Graph()
    i64 = np.int64
    c_eps = g.const("eps", np.array(eps, np.float32))
    c_two_f = g.const("two_f", np.array(2.0, np.float32))
    c_scale = g.const("scale", np.array(1.0 / math.sqrt(head_dim), np.float32))
    c_zero_f = g.const("zero_f", np.array(0.0, np.float32))
    c_neg = g.const("neg", np.array(_NEG, np.float32))
    c_heads_shape = g.const("heads_shape", np.array([0, 0, heads, head_dim], i64))
    c_kv_shape = g.const("kv_shape", np.array([0, 0, kv_heads, head_dim], i64))
    c_merge_shape = g.const("merge_shape", np.array([0, 0, heads * head_dim], i64))
    c_axis0 = g.const("axis0", np.array([0], i64))
    c_axis1 = g.const("axis1", np.array([1], i64))
    c_zero_i = g.const("zero_i", np.array(0, i64))
    c_one_i = g.const("one_i", np.array(1, i64))
    c_two_i = g.const("two_i", np.array(2, i64))
    cos, sin = _rope_tables(config, head_dim)
    c_cos = g.const("rope_cos", cos)
    c_sin = g.const("rope_sin", sin)
    embed = weights["model.embed_tokens.weight"]
    c_embed = g.const("embed", embed)
    # Untied output embeddings when the checkpoint has its own lm_head (and does not say
    # they are tied); otherwise the input embeddings, as transformers ties them.
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in weights
    lm_head = embed if tied else weights["lm_head.weight"]
    c_lm_head = g.const("lm_head_t", lm_head.T)

    def linear(x: str, name: str) -> str:
        out = g.op("MatMul", x, g.const(name + "_t", weights[name].T))
        bias = name.removesuffix(".weight") + ".bias"  # Qwen2's q/k/v (any present)
        if bias in weights:
            out = g.op("Add", out, g.const(bias, weights[bias]))
        return out

    def rms_norm(x: str, name: str) -> str:
        # Written as Pow/ReduceMean/Add/Sqrt/Div/Mul: the pattern onnxruntime fuses into
        # one SimplifiedLayerNormalization kernel.
        mean = g.op("ReduceMean", g.op("Pow", x, c_two_f), axes=[-1], keepdims=1)
        scaled = g.op("Div", x, g.op("Sqrt", g.op("Add", mean, c_eps)))
        return g.op("Mul", scaled, g.const(name, weights[name]))

    def rotate(x: str, num_heads: int) -> str:
        """Rotary position embedding of [batch, tokens, num_heads * head_dim] (onnxruntime's
        kernel)."""
        return g.op(
            "RotaryEmbedding",
            x,
            "positions",
            c_cos,
            c_sin,
            domain="com.microsoft",
            interleaved=0,
            num_heads=num_heads,
        )

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("positions", TensorProto.INT64, ["batch", "tokens"]),
        helper.make_tensor_value_info("past_len", TensorProto.INT64, ["batch"]),
    ]
    if layout == "paged":
        inputs += [
            helper.make_tensor_value_info("block_table", TensorProto.INT64, ["batch", "blocks"]),
            helper.make_tensor_value_info(
                "k_cache", TensorProto.FLOAT, [kv_heads, "slots", "block_size", head_dim]
            ),
            helper.make_tensor_value_info(
                "v_cache", TensorProto.FLOAT, [kv_heads, "slots", "block_size", head_dim]
            ),
        ]
        n_blocks = g.op(
            "Div",
            g.op("Gather", g.op("Shape", "k_cache"), c_one_i, axis=0),
            g.const("layers", np.array(layers, i64)),
        )
    else:
        inputs += [
            helper.make_tensor_value_info(
                "past_k", TensorProto.FLOAT, [layers, "batch", "past", kv_heads, head_dim]
            ),
            helper.make_tensor_value_info(
                "past_v", TensorProto.FLOAT, [layers, "batch", "past", kv_heads, head_dim]
            ),
        ]

    # Additive mask [batch, 1, tokens, past + tokens]: a past slot counts when it is below
    # the sequence's past_len; a new token sees itself and the new tokens before it.
    x = g.op("Gather", c_embed, "input_ids", axis=0)
    tokens = g.op("Gather", g.op("Shape", "input_ids"), c_one_i, axis=0)
    if layout == "paged":
        table_shape = g.op("Shape", "block_table")
        block_size = g.op("Gather", g.op("Shape", "v_cache"), c_two_i, axis=0)
        past_slots = g.op("Mul", g.op("Gather", table_shape, c_one_i, axis=0), block_size)
    else:
        past_slots = g.op("Gather", g.op("Shape", "past_k"), c_two_i, axis=0)
    slot_ids = g.op("Range", c_zero_i, past_slots, c_one_i)
    past_ok = g.op(
        "Less",
        g.op("Unsqueeze", slot_ids, c_axis0),
        g.op("Unsqueeze", "past_len", c_axis1),
    )
    past_mask = g.op("Where", past_ok, c_zero_f, c_neg)  # [batch, past]
    past_mask = g.op("Unsqueeze", past_mask, g.const("axes12", np.array([1, 2], i64)))
    token_ids = g.op("Range", c_zero_i, tokens, c_one_i)
    causal_ok = g.op(
        "LessOrEqual",
        g.op("Unsqueeze", token_ids, c_axis0),
        g.op("Unsqueeze", token_ids, c_axis1),
    )
    causal_mask = g.op("Where", causal_ok, c_zero_f, c_neg)  # [tokens, tokens]
    batch = g.op("Gather", g.op("Shape", "input_ids"), c_axis0, axis=0)
    one = g.const("one_1", np.array([1], i64))
    tokens_1 = g.op("Unsqueeze", tokens, c_axis0)
    past_1 = g.op("Unsqueeze", past_slots, c_axis0)
    past_mask = g.op("Expand", past_mask, g.op("Concat", batch, one, tokens_1, past_1, axis=0))
    causal_mask = g.op(
        "Expand", causal_mask, g.op("Concat", batch, one, tokens_1, tokens_1, axis=0)
    )
    mask = g.op("Concat", past_mask, causal_mask, axis=-1)
    if layout == "paged":
        c_cache_shape = g.const("cache_shape", np.array([0, 0, -1, head_dim], i64))
        split_sizes = g.op("Concat", past_1, tokens_1, axis=0)
        head_mask = g.op("Transpose", mask, perm=[1, 0, 2, 3])  # [1, batch, tokens, all]
        if group > 1:
            # Grouped queries attend as [kv_heads, batch, group * tokens]: the mask once per
            # query head of the group.
            head_mask = g.op(
                "Tile", head_mask, g.const("group_tile", np.array([1, 1, group, 1], i64))
            )
            c_group_q = g.const("group_q", np.array([0, 0, kv_heads, group, head_dim], i64))
            c_group_rows = g.const("group_rows", np.array([0, 0, -1, head_dim], i64))
            c_group_out = g.const("group_out", np.array([0, 0, group, -1, head_dim], i64))
    elif group > 1:
        c_repeat = g.const("kv_repeat", np.array([1, 1, 1, group, 1], i64))
        c_axis3 = g.const("axis3", np.array([3], i64))

    def repeat_kv(x: str) -> str:
        """[batch, positions, kv_heads, dim] -> [.., heads, ..]: each kv head once per query
        head of its group (transformers' repeat_kv; dense baseline only)."""
        if group == 1:
            return x
        x = g.op("Expand", g.op("Unsqueeze", x, c_axis3), c_repeat)
        return g.op("Reshape", x, c_heads_shape)

    def dense_attention(q: str, k: str, v: str, past_k: str, past_v: str) -> str:
        """Attention over past + new keys laid end to end; [batch, tokens, heads, dim]."""
        keys = repeat_kv(g.op("Concat", past_k, k, axis=1))  # [batch, all, heads, head_dim]
        values = repeat_kv(g.op("Concat", past_v, v, axis=1))
        scores = g.op(
            "MatMul",
            g.op("Transpose", q, perm=[0, 2, 1, 3]),
            g.op("Transpose", keys, perm=[0, 2, 3, 1]),
        )
        attn = g.op("Softmax", g.op("Add", g.op("Mul", scores, c_scale), mask), axis=-1)
        out = g.op("MatMul", attn, g.op("Transpose", values, perm=[0, 2, 1, 3]))
        return g.op("Transpose", out, perm=[0, 2, 1, 3])  # [batch, tokens, heads, dim]

    def paged_attention(q: str, k: str, v: str, rows: str) -> str:
        """The pool is head-major, so the gathered blocks of one sequence and head lie end to
        end: one matmul per (head, sequence) over its whole cache, and the cache is never
        transposed or joined to the new keys (only the small score rows are)."""
        keys = g.op("Reshape", g.op("Gather", "k_cache", rows, axis=1), c_cache_shape)
        values = g.op("Reshape", g.op("Gather", "v_cache", rows, axis=1), c_cache_shape)
        # keys/values: [heads, batch, past, dim]; q: [batch, tokens, heads, dim]
        past = g.op("MatMul", keys, g.op("Transpose", q, perm=[2, 0, 3, 1]))
        past = g.op("Transpose", past, perm=[0, 1, 3, 2])  # [heads, batch, tokens, past]
        q_heads = g.op("Transpose", q, perm=[2, 0, 1, 3])  # [heads, batch, tokens, dim]
        new = g.op("MatMul", q_heads, g.op("Transpose", k, perm=[2, 0, 3, 1]))
        scores = g.op("Concat", past, new, axis=-1)
        attn = g.op("Softmax", g.op("Add", g.op("Mul", scores, c_scale), head_mask), axis=-1)
        attn_past, attn_new = g.op_n("Split", attn, split_sizes, axis=-1, outputs=2)
        out = g.op(
            "Add",
            g.op("MatMul", attn_past, values),
            g.op("MatMul", attn_new, g.op("Transpose", v, perm=[2, 0, 1, 3])),
        )
        return g.op("Transpose", out, perm=[1, 2, 0, 3])  # [batch, tokens, heads, dim]

    def grouped_paged_attention(q: str, k: str, v: str, rows: str) -> str:
        """paged_attention with grouped-query heads: the cache holds only kv heads, and each
        kv head's gathered blocks are attended by its whole group of query heads at once
        (their rows stacked), so the cache is never repeated or copied per query head."""
        keys = g.op("Reshape", g.op("Gather", "k_cache", rows, axis=1), c_cache_shape)
        values = g.op("Reshape", g.op("Gather", "v_cache", rows, axis=1), c_cache_shape)
        # q: [batch, tokens, heads, dim] -> [kv_heads, batch, group * tokens, dim]
        q_groups = g.op("Transpose", g.op("Reshape", q, c_group_q), perm=[2, 0, 3, 1, 4])
        q_rows = g.op("Reshape", q_groups, c_group_rows)
        past = g.op("MatMul", q_rows, g.op("Transpose", keys, perm=[0, 1, 3, 2]))
        new = g.op("MatMul", q_rows, g.op("Transpose", k, perm=[2, 0, 3, 1]))
        scores = g.op("Concat", past, new, axis=-1)
        attn = g.op("Softmax", g.op("Add", g.op("Mul", scores, c_scale), head_mask), axis=-1)
        attn_past, attn_new = g.op_n("Split", attn, split_sizes, axis=-1, outputs=2)
        out = g.op(
            "Add",
            g.op("MatMul", attn_past, values),
            g.op("MatMul", attn_new, g.op("Transpose", v, perm=[2, 0, 1, 3])),
        )  # [kv_heads, batch, group * tokens, dim]
        out = g.op("Reshape", out, c_group_out)  # [kv_heads, batch, group, tokens, dim]
        out = g.op("Transpose", out, perm=[1, 3, 0, 2, 4])
        return g.op("Reshape", out, c_heads_shape)  # [batch, tokens, heads, dim]

    new_ks, new_vs = [], []
    for layer in range(layers):
        p = f"model.layers.{layer}."
        h = rms_norm(x, p + "input_layernorm.weight")
        q = rotate(linear(h, p + "self_attn.q_proj.weight"), heads)
        q = g.op("Reshape", q, c_heads_shape)
        k = g.op("Reshape", rotate(linear(h, p + "self_attn.k_proj.weight"), kv_heads), c_kv_shape)
        v = g.op("Reshape", linear(h, p + "self_attn.v_proj.weight"), c_kv_shape)
        new_ks.append(g.op("Unsqueeze", k, c_axis0))
        new_vs.append(g.op("Unsqueeze", v, c_axis0))
        if layout == "paged":
            rows = g.op(
                "Add",
                "block_table",
                g.op("Mul", n_blocks, g.const(f"layer_{layer}", np.array(layer, i64))),
            )
            attend = paged_attention if group == 1 else grouped_paged_attention
            out = attend(q, k, v, rows)
        else:
            index = g.const(f"layer_{layer}", np.array(layer, i64))
            past_k = g.op("Gather", "past_k", index, axis=0)
            past_v = g.op("Gather", "past_v", index, axis=0)
            out = dense_attention(q, k, v, past_k, past_v)
        out = g.op("Reshape", out, c_merge_shape)
        x = g.op("Add", x, linear(out, p + "self_attn.o_proj.weight"))
        h = rms_norm(x, p + "post_attention_layernorm.weight")
        gate = linear(h, p + "mlp.gate_proj.weight")
        up = linear(h, p + "mlp.up_proj.weight")
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, linear(act, p + "mlp.down_proj.weight"))

    x = rms_norm(x, "model.norm.weight")
    # Logits of each row's last real token: the one at its highest position. Prompts of
    # different lengths share a prefill run right-padded with position 0, which never wins
    # (a one-token prompt at position 0 is column 0, ArgMax's first pick on ties).
    last_index = g.op("ArgMax", "positions", axis=1, keepdims=1)  # [batch, 1]
    last = g.op("GatherND", x, last_index, batch_dims=1)  # [batch, hidden]
    g.nodes.append(helper.make_node("MatMul", [last, c_lm_head], ["logits"]))
    g.nodes.append(helper.make_node("Concat", new_ks, ["new_k"], axis=0))
    g.nodes.append(helper.make_node("Concat", new_vs, ["new_v"], axis=0))
    new_shape = [layers, "batch", "tokens", kv_heads, head_dim]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", vocab]),
        helper.make_tensor_value_info("new_k", TensorProto.FLOAT, new_shape),
        helper.make_tensor_value_info("new_v", TensorProto.FLOAT, new_shape),
    ]
    graph = helper.make_graph(g.nodes, f"llama_{layout}", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", _OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="agentd",
    )
    model.ir_version = 8
    model.doc_string = json.dumps(
        {
            "layout": layout,
            "layers": layers,
            "heads": heads,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab,
            "context_length": config["max_position_embeddings"],
        }
    )
    return model


def export_onnx(hf_dir: Path, out: Path, *, layout: str = "paged") -> Path:
    """Write the fp32 graph for the checkpoint in ``hf_dir`` to ``out``."""
    import onnx

    config, weights = _load_hf(Path(hf_dir))
    model = build_model(config, weights, layout=layout)
    onnx.checker.check_model(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def quantize_int8(fp32: Path, out: Path) -> Path:
    """Dynamic int8 quantisation of the weight matmuls (activations stay float)."""
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(
        str(fp32),
        str(out),
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        # onnx's type inference stops at the com.microsoft RotaryEmbedding, so some MatMul
        # inputs (the grouped-query attention's) have no inferred type: all are float.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--int8", type=Path, help="also write the int8 graph here")
    parser.add_argument("--dense", action="store_true", help="also write the dense baseline")
    args = parser.parse_args(argv)
    try:
        fp32 = export_onnx(args.hf_dir, args.out_dir / "model.fp32.onnx")
    except ValueError as exc:  # an architecture it cannot export: the reason, no traceback
        parser.error(f"{args.hf_dir}: {exc}")
    print(f"wrote {fp32} ({fp32.stat().st_size / 1e6:.1f} MB)")
    if args.int8:
        int8 = quantize_int8(fp32, args.int8)
        print(f"wrote {int8} ({int8.stat().st_size / 1e6:.1f} MB)")
    if args.dense:
        dense = export_onnx(args.hf_dir, args.out_dir / "model.dense.fp32.onnx", layout="dense")
        print(f"wrote {dense}")


if __name__ == "__main__":
    main()
