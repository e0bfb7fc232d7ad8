"""Write a Llama, Mistral or Qwen2 Hugging Face folder as a GGUF file for llama.cpp.

Reads config.json, model.safetensors and tokenizer.json (byte-level BPE) with numpy only:
no torch or transformers. Tensor names, the Q/K row order and the metadata keys follow
llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``; ``Qwen2Model`` for Qwen2, which keeps
HF's rotate-half row order and adds the q/k/v biases). Grouped-query attention, untied
output embeddings and linear/llama3 RoPE scaling carry over; sliding-window configs are
refused as by the ONNX exporter::

    python -m agentd.generate.gguf_export HF_DIR OUT.gguf [--dtype f16]

Needs the ``gguf`` writer package (``pip install 'agentd[gguf]'``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from agentd.errors import FailedPrecondition, InvalidArgument

__all__ = ["export_gguf"]

DTYPES = ("f32", "f16")

# HF Llama parameter name (inside model.layers.N.) -> GGUF tensor name (inside blk.N.)
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # Qwen2 (and any checkpoint with attention biases)
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
}
# HF model_type -> GGUF architecture (Mistral without a sliding window is Llama)
_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def _permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half row order of a Q or K projection -> llama.cpp's interleaved pairs.

    HF keeps the two halves of each head's rotary pairs apart (rows i and i + d/2); GGUF
    "llama" expects them adjacent (rows 2i and 2i + 1). Same as ``LlamaModel.permute``.
    """
    rows = weights.shape[0]
    return (
        weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_rope(writer: Any, config: dict[str, Any], arch: str, head_dim: int) -> np.ndarray | None:
    """Write the RoPE metadata; returns llama3's per-frequency factors (the ``rope_freqs``
    tensor llama.cpp divides each frequency by), or None."""
    import gguf

    from agentd.generate.onnx_export import rope_inv_freq, rope_parameters

    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "llama3":
        if arch != "llama":
            raise InvalidArgument(f"llama3 RoPE scaling is only exported for Llama, not {arch}")
        plain = {"rope_parameters": {"rope_theta": rope["rope_theta"]}}
        return rope_inv_freq(plain, head_dim) / rope_inv_freq(config, head_dim)
    return None


def _tokenizer_metadata(tokenizer_json: dict[str, Any]) -> tuple[list[str], list[int], list[str]]:
    """Tokens by id, their GGUF token types, and the BPE merges as "a b" strings."""
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidArgument("only byte-level BPE tokenizers can be exported to GGUF")
    import gguf

    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    for added in tokenizer_json.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [int(gguf.TokenType.UNUSED)] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = int(gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(hf_dir: Path, out: Path, dtype: str = "f32") -> Path:
    """Convert the HF Llama/Mistral/Qwen2 folder ``hf_dir`` to the GGUF file ``out`` (f32 or
    f16)."""
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        import gguf
    except ImportError:
        raise FailedPrecondition(
            "GGUF export needs the gguf package; install it with: pip install 'agentd[gguf]'"
        ) from None
    from safetensors.numpy import load_file

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = _ARCHITECTURES.get(config.get("model_type", ""))
    if arch is None:
        raise InvalidArgument(
            f"{hf_dir}: model_type must be one of {', '.join(_ARCHITECTURES)}, "
            f"got {config.get('model_type')!r}"
        )
    from agentd.generate.onnx_export import check_architecture

    try:
        check_architecture(config)  # the same refusals: sliding windows, rope types, kv heads
    except ValueError as exc:
        raise InvalidArgument(f"{hf_dir}: {exc}") from None
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text())
    weights = load_file(str(hf_dir / "model.safetensors"))

    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // n_head)
    layers = int(config["num_hidden_layers"])
    tokens, token_types, merges = _tokenizer_metadata(tokenizer_json)
    if len(tokens) != int(config["vocab_size"]):
        raise InvalidArgument(
            f"tokenizer has {len(tokens)} tokens, the model's vocab_size is {config['vocab_size']}"
        )

    known = {*_GLOBAL_TENSORS} | {
        f"model.layers.{layer}.{name}" for layer in range(layers) for name in _LAYER_TENSORS
    }
    unknown = sorted(set(weights) - known)
    if unknown:  # e.g. MLP biases or q/k norms: dropping them would give another model
        raise InvalidArgument(
            f"{hf_dir}: tensors this exporter does not convert: {', '.join(unknown[:5])}"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(hf_dir.resolve().parent.name if hf_dir.name == "hf" else hf_dir.name)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(head_dim)
    rope_factors = _add_rope(writer, config, arch, head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(
        gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16
    )

    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # the GPT-2 split regex, as HF's ByteLevel pre-tokenizer
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    for key, add_id in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            add_id(int(value))
    writer.add_add_bos_token(False)  # prompts and the chat template carry their own BOS
    tokenizer_config = hf_dir / "tokenizer_config.json"
    if tokenizer_config.exists():
        template = json.loads(tokenizer_config.read_text()).get("chat_template")
        if isinstance(template, str):
            writer.add_chat_template(template)

    def add_tensor(name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        # Like llama.cpp's converter: 1-D tensors (norms) stay f32.
        if dtype == "f16" and array.ndim > 1:
            array = array.astype(np.float16)
        writer.add_tensor(name, array)

    if rope_factors is not None:
        add_tensor("rope_freqs.weight", rope_factors)
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in weights
    for name, gguf_name in _GLOBAL_TENSORS.items():
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        add_tensor(gguf_name, weights[name])
    for layer in range(layers):
        prefix = f"model.layers.{layer}."
        for name, gguf_name in _LAYER_TENSORS.items():
            if name.endswith(".bias") and prefix + name not in weights:
                continue
            array = weights[prefix + name]
            # llama.cpp's "llama" rotates interleaved pairs, "qwen2" HF's halves (NEOX).
            if arch == "llama" and name.startswith(("self_attn.q_proj.", "self_attn.k_proj.")):
                array = _permute_rotary(array, n_head if "q_proj" in name else n_head_kv)
            add_tensor(f"blk.{layer}.{gguf_name}", array)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a HF Llama/Qwen2 folder to GGUF.")
    parser.add_argument("hf_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=DTYPES, default="f32")
    args = parser.parse_args(argv)
    try:
        path = export_gguf(args.hf_dir, args.out, args.dtype)
    except InvalidArgument as exc:  # a model it cannot convert: the reason, no traceback
        parser.error(str(exc))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")


if __name__ == "__main__":
    main()
