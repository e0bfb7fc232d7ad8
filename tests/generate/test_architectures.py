"""The architectures of the common small models through the ONNX exporter/engine and GGUF.

Each model is built here from a transformers config with random weights (2 layers, hidden
64, vocab 260), saved with safetensors and exported; transformers is the reference: greedy
tokens identical to ``model.generate`` for 32 tokens, last-position logits within tolerance,
through the real TokenEngine (and the dense baseline graph) and through llama.cpp.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agentd.generate.onnx_export import build_model, export_onnx, rope_inv_freq
from agentd.generate.onnx_lm import graph_shape, open_session
from agentd.generate.types import SamplingParams
from agentd.testing.lm import build_engine, dense_greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOKENS = 32
VOCAB = 260  # 256 bytes and 4 merges (llama.cpp wants a BPE vocab to have merges)
EOS = 255
GREEDY = SamplingParams(temperature=0.0, max_tokens=TOKENS)
PROMPTS = [[7, 42, 99, 3, 120, 64, 17, 200, 5], [250, 11]]
BASE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    # Wider than the default 0.02, so the logits are far apart and greedy picks are stable.
    "initializer_range": 0.15,
    "bos_token_id": 0,
    "eos_token_id": EOS,
    "pad_token_id": 0,
}
ARCHITECTURES = {
    "llama-gqa": ("LlamaConfig", {"num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen2": (
        "Qwen2Config",
        {
            "num_key_value_heads": 1,
            "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        },
    ),
    # Untied, and a head_dim of its own (heads * head_dim != hidden_size, as in Qwen3/Gemma).
    "llama-untied": (
        "LlamaConfig",
        {"num_key_value_heads": 4, "tie_word_embeddings": False, "head_dim": 32},
    ),
    "llama3-rope": (
        "LlamaConfig",
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500_000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "linear-rope": (
        "LlamaConfig",
        {
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
        },
    ),
}


def byte_tokenizer() -> dict:
    """A byte-level BPE tokenizer.json: one token per byte, then four merges (vocab 260)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    vocab = {c: b for b, c in chars.items()}
    merges = ["Ġ t", "h e", "i n", "e r"]
    for merge in merges:
        vocab[merge.replace(" ", "")] = len(vocab)
    return {
        "version": "1.0",
        "added_tokens": [],
        "model": {"type": "BPE", "vocab": vocab, "merges": merges},
    }


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request, tmp_path_factory) -> dict:
    """The HF folder, its transformers model and the exported paged/dense graphs."""
    config_class, extra = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**BASE, **extra)
    hf_model = transformers.AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(folder / "hf", safe_serialization=True)
    (folder / "hf" / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
    return {
        "name": request.param,
        "hf_dir": folder / "hf",
        "hf": hf_model,
        "paged": export_onnx(folder / "hf", folder / "paged.onnx"),
        "dense": export_onnx(folder / "hf", folder / "dense.onnx", layout="dense"),
        "folder": folder,
    }


@pytest.fixture(scope="module")
def reference(model: dict) -> list[list[int]]:
    """transformers' greedy continuations of PROMPTS (up to TOKENS, stopping before EOS)."""
    results = []
    for prompt in PROMPTS:
        with torch.no_grad():
            out = model["hf"].generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=TOKENS,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=0,
            )
        tokens = out[0, len(prompt) :].tolist()
        results.append(tokens[: tokens.index(EOS)] if EOS in tokens else tokens)
    assert max(len(tokens) for tokens in results) >= TOKENS // 2
    return results


def test_config_is_the_architecture(model: dict) -> None:
    config = json.loads((model["hf_dir"] / "config.json").read_text())
    session = open_session(model["paged"], threads=1)
    shape = graph_shape(session)
    assert shape["heads"] == 4
    assert shape["kv_heads"] == config["num_key_value_heads"]
    if model["name"] == "qwen2":
        assert config["model_type"] == "qwen2"
    if model["name"] in ("qwen2", "llama-untied"):
        assert not config["tie_word_embeddings"]


async def engine_tokens(path: Path) -> list[list[int]]:
    engine = build_engine(path, blocks=32, block_size=8, eos=(EOS,))
    try:

        async def run(prompt: list[int]) -> list[int]:
            return [t async for t in engine.stream(prompt, GREEDY)]

        # Together, so prefill and decode run batched across the two prompts.
        return list(await asyncio.gather(*(run(p) for p in PROMPTS)))
    finally:
        await engine.close()


def test_engine_greedy_matches_transformers(model: dict, reference: list[list[int]]) -> None:
    assert asyncio.run(engine_tokens(model["paged"])) == reference


def test_dense_greedy_matches_transformers(model: dict, reference: list[list[int]]) -> None:
    for prompt, expected in zip(PROMPTS, reference, strict=True):
        tokens, _ = dense_greedy(model["dense"], prompt, len(expected))
        assert tokens == expected


def test_last_logits_within_tolerance(model: dict, reference: list[list[int]]) -> None:
    sequence = PROMPTS[0] + reference[0]
    with torch.no_grad():
        expected = model["hf"](torch.tensor([sequence])).logits[0, -1].numpy()
    engine = build_engine(model["paged"], blocks=32, block_size=8)
    try:
        blocks = np.asarray(engine.pool.borrow(engine.pool.blocks_for(len(sequence))))
        logits, _, _ = engine.forward(
            np.array([sequence]),
            np.arange(len(sequence))[None],
            np.array([0]),
            blocks[None, :1],
        )
    finally:
        asyncio.run(engine.close())
    np.testing.assert_allclose(logits[0], expected, atol=2e-4 * np.abs(expected).max() + 1e-4)


def hf_config(config_class: str = "LlamaConfig", **extra) -> dict:
    extra = {"num_key_value_heads": 2} | extra
    return getattr(transformers, config_class)(**(BASE | extra)).to_dict()


def random_weights(config_class: str, **extra) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    extra = {"num_key_value_heads": 2} | extra
    config = getattr(transformers, config_class)(**(BASE | extra))
    model = transformers.AutoModelForCausalLM.from_config(config)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("config_class", "extra"),
    [
        ("MistralConfig", {"sliding_window": 64}),
        ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}),
    ],
)
def test_sliding_window_is_refused_by_name(config_class: str, extra: dict) -> None:
    config = hf_config(config_class, **extra)
    with pytest.raises(ValueError, match="sliding_window 64"):
        build_model(config, {})


@pytest.mark.parametrize(
    ("config_class", "extra"),
    [
        ("MistralConfig", {"sliding_window": 256}),  # as long as the context: plain attention
        ("MistralConfig", {"sliding_window": None}),
        ("Qwen2Config", {"use_sliding_window": False, "sliding_window": 64}),
    ],
)
def test_window_that_never_slides_is_plain_attention(config_class: str, extra: dict) -> None:
    config = hf_config(config_class, **extra)
    build_model(config, random_weights(config_class, **extra))  # no refusal


def test_unknown_rope_and_bad_kv_heads_are_refused() -> None:
    config = hf_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        build_model(config, {})
    config = hf_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide"):
        build_model(config, {})


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 1_000_000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
            "rope_theta": 500_000.0,
        },
    ],
)
def test_rope_frequencies_match_transformers_in_both_config_shapes(rope: dict) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(**(BASE | {"rope_parameters": rope}))
    if rope["rope_type"] == "default":
        expected = 1.0 / (rope["rope_theta"] ** (np.arange(0, 16, 2) / 16))
    else:
        expected = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, "cpu")[0].numpy()
    # transformers 5 writes rope_parameters; earlier versions rope_scaling + rope_theta.
    new = {"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": rope}
    old = {
        "rope_theta": rope["rope_theta"],
        "rope_scaling": {
            ("type" if rope["rope_type"] == "linear" else "rope_type"): rope["rope_type"]
        }
        | {k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")},
    }
    for shape in (new, old):
        np.testing.assert_allclose(rope_inv_freq(shape, 16), expected, rtol=1e-6)


def test_pool_holds_only_kv_heads(model: dict) -> None:
    """The GQA pool's bytes are kv_heads/heads of the MHA pool of the same shape."""
    config = json.loads((model["hf_dir"] / "config.json").read_text())
    engine = build_engine(model["paged"], blocks=16, block_size=8)
    try:
        pool = engine.pool
        kv_heads = config["num_key_value_heads"]
        assert pool.heads == kv_heads
        head_dim = config.get("head_dim") or 16
        mha_bytes = 2 * config["num_hidden_layers"] * 16 * 8 * 4 * head_dim * 4  # K+V, all heads
        assert pool.keys.nbytes + pool.values.nbytes == mha_bytes * kv_heads // 4
    finally:
        asyncio.run(engine.close())


def gguf_greedy(path: Path) -> list[list[int]]:
    from agentd.generate.gguf_backend import load_gguf

    generator = load_gguf(path, "arch-gguf")
    try:
        assert generator.info.eos_token_ids == (EOS,)

        async def run() -> list[list[int]]:
            return [[t async for t in generator.stream(p, GREEDY)] for p in PROMPTS]

        return asyncio.run(run())
    finally:
        asyncio.run(generator.close())


def test_gguf_greedy_matches_transformers(model: dict, reference: list[list[int]]) -> None:
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from agentd.generate.gguf_export import export_gguf

    path = export_gguf(model["hf_dir"], model["folder"] / "model.f32.gguf", "f32")
    assert gguf_greedy(path) == reference


def test_gguf_refuses_sliding_window(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from agentd.errors import InvalidArgument
    from agentd.generate.gguf_export import export_gguf

    (tmp_path / "config.json").write_text(json.dumps(hf_config("MistralConfig", sliding_window=64)))
    with pytest.raises(InvalidArgument, match="sliding_window 64"):
        export_gguf(tmp_path, tmp_path / "model.gguf")
    done = subprocess.run(
        [sys.executable, "-m", "agentd.generate.gguf_export", str(tmp_path), str(tmp_path / "x")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "sliding_window 64" in done.stderr
    assert "Traceback" not in done.stderr


def test_int8_graph_runs_with_kv_heads_only(model: dict, reference: list[list[int]]) -> None:
    """--int8 quantises each graph's weight matmuls (it failed on the grouped-query graphs:
    untyped MatMul inputs); the engine runs it with the kv-heads pool and its first greedy
    token of each prompt is transformers'."""
    from agentd.generate.onnx_export import quantize_int8

    int8 = quantize_int8(model["paged"], model["folder"] / "paged.int8.onnx")
    kv_heads = graph_shape(open_session(int8, threads=1))["kv_heads"]
    assert (
        kv_heads == json.loads((model["hf_dir"] / "config.json").read_text())["num_key_value_heads"]
    )
    tokens = asyncio.run(engine_tokens(int8))
    # Random weights make the int8 rounding flip a later pick now and then, after which the
    # continuations part: the first token of each prompt must agree, and all must run.
    assert [t[:1] for t in tokens] == [r[:1] for r in reference]


def test_cli_names_the_refused_field(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    (tmp_path / "config.json").write_text(json.dumps(hf_config("MistralConfig", sliding_window=64)))
    save_file(
        {"model.embed_tokens.weight": np.zeros((VOCAB, 64), np.float32)},
        str(tmp_path / "model.safetensors"),
    )
    done = subprocess.run(
        [sys.executable, "-m", "agentd.generate.onnx_export", str(tmp_path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "sliding_window 64" in done.stderr
    assert "Traceback" not in done.stderr


def test_tensors_left_unconverted_are_refused(tmp_path: Path) -> None:
    """A checkpoint with weights the graph would drop (here Qwen3-style q/k norms) is
    refused by name rather than exported as another model."""
    from safetensors.numpy import save_file

    from agentd.errors import InvalidArgument
    from agentd.generate.gguf_export import export_gguf

    config = hf_config()
    weights = random_weights("LlamaConfig")
    weights["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    with pytest.raises(ValueError, match=r"does not convert: model\.layers\.0\.self_attn\.q_norm"):
        build_model(config, weights)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text(json.dumps(byte_tokenizer()))
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidArgument, match=r"does not convert: model\.layers\.0\.self_attn"):
        export_gguf(tmp_path, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
