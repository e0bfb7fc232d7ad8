"""The built-in model gives the same greedy text in transformers (the reference) and in the
ONNX token engine (fp32); the shipped int8 graph agrees on most tokens.

(GGUF against transformers is in tests/generate/test_lm_backends.py.)
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers

from agentd.generate.chat import render_chat
from agentd.generate.onnx_export import export_onnx
from agentd.generate.tokenizer import Tokenizer
from agentd.generate.types import SamplingParams
from agentd.inference.repository import builtin_models_dir
from agentd.testing.lm import build_engine, paged_decode

HF_DIR = Path(__file__).resolve().parents[3] / "models" / "tinylm" / "hf"
TOKENS = 32
PROMPTS = [
    render_chat([{"role": "user", "content": "tell me a story about a fox"}]),
    render_chat([{"role": "user", "content": "what is 7 plus 5?"}]),
    "<|bos|>Once upon a time, there was a brave owl named Ada.",
    "<|bos|>The red ball",
]
# The int8 graph must pick the reference's token at this share of positions, at least.
INT8_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def prompt_ids() -> list[list[int]]:
    tokenizer = Tokenizer(HF_DIR / "tokenizer.json")
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def reference(prompt_ids) -> list[list[int]]:
    """transformers' greedy continuations, run past <|end|> so every one is TOKENS long."""
    model = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR).eval()
    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            generated = model.generate(
                torch.tensor([ids]),
                max_new_tokens=TOKENS,
                min_new_tokens=TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=5,
            )
            out.append(generated[0, len(ids) :].tolist())
    return out


def test_onnx_fp32_engine_matches_transformers(tmp_path, prompt_ids, reference):
    graph = export_onnx(HF_DIR, tmp_path / "model.onnx")
    engine = build_engine(graph, blocks=64, block_size=16, eos=(), threads=2)
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)

    async def one(ids: list[int]) -> list[int]:
        return [t async for t in engine.stream(ids, params)]

    async def run() -> list[list[int]]:
        try:  # all prompts at once: batching must not change a token
            return list(await asyncio.gather(*(one(ids) for ids in prompt_ids)))
        finally:
            await engine.close()

    assert asyncio.run(run()) == reference


def test_int8_graph_agrees_on_most_tokens(prompt_ids, reference):
    graph = builtin_models_dir() / "tinylm" / "model.onnx"
    agree = total = 0
    for ids, expected in zip(prompt_ids, reference, strict=True):
        picks, _ = paged_decode(graph, ids, len(expected), forced=expected)
        agree += sum(p == e for p, e in zip(picks, expected, strict=True))
        total += len(expected)
    rate = agree / total
    print(f"int8 agreement with transformers (teacher-forced): {rate:.3f} of {total} tokens")
    assert rate >= INT8_AGREEMENT
