"""One model in four forms behind the same OpenAI API: the built-in int8 ONNX engine, an
fp32 ONNX export, GGUF (llama.cpp) and the HF folder (transformers), each a plugin folder
with ``kind: language-model``. The fp32 forms must give the same greedy text."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from agentd.generate.gguf_export import export_gguf
from agentd.generate.onnx_export import export_onnx
from agentd.testing import RunningServer, start_server

HF_DIR = Path(__file__).resolve().parents[2] / "models" / "tinylm" / "hf"
QUESTIONS = ["what colour is the sky?", "tell me a story about a fox", "what is 2 plus 3?"]


def _lm_folder(root: Path, name: str, platform: str, model: str) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(HF_DIR / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "name": name,
        "kind": "language-model",
        "platform": platform,
        "model": model,
        "context_length": 1024,
        "eos_token_ids": [1],
        "kv_cache": {"block_size": 16, "blocks": 256},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory) -> Iterator[RunningServer]:
    plugins = tmp_path_factory.mktemp("plugins")
    models = plugins / "models"
    export_onnx(
        HF_DIR, _lm_folder(models, "tinylm-fp32", "onnxruntime", "model.onnx") / "model.onnx"
    )
    export_gguf(HF_DIR, _lm_folder(models, "tinylm-gguf", "gguf", "model.gguf") / "model.gguf")
    hf = _lm_folder(models, "tinylm-hf", "hf", "hf")
    shutil.copytree(HF_DIR, hf / "hf")
    broken = _lm_folder(models, "broken-lm", "onnxruntime", "model.onnx")
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    running = start_server(["--plugins", str(plugins)], timeout=90)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(lm_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=lm_server.url + "/v1", api_key="-", max_retries=0) as c:
        yield c


def _answers(client: openai.OpenAI, model: str, stream: bool) -> list[str]:
    answers = []
    for question in QUESTIONS:
        kwargs = {
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 24,
            "temperature": 0,
        }
        if stream:
            chunks = client.chat.completions.create(**kwargs, stream=True)
            answers.append("".join(c.choices[0].delta.content or "" for c in chunks))
        else:
            answers.append(client.chat.completions.create(**kwargs).choices[0].message.content)
    return answers


def test_every_form_is_listed_and_a_broken_one_is_not(client, lm_server):
    ids = {m.id for m in client.models.list()}
    assert {"tinylm", "tinylm-fp32", "tinylm-gguf", "tinylm-hf"} <= ids
    assert "broken-lm" not in ids
    assert "broken-lm" in lm_server.log() and "failed to load" in lm_server.log()


def test_fp32_onnx_gguf_and_hf_give_the_same_greedy_text(client):
    reference = _answers(client, "tinylm-hf", stream=False)
    assert all(reference)
    assert _answers(client, "tinylm-fp32", stream=True) == reference
    assert _answers(client, "tinylm-gguf", stream=True) == reference
    assert _answers(client, "tinylm-hf", stream=True) == reference


def test_seeded_sampling_matches_across_backends(client):
    def sample(model: str) -> str:
        return (
            client.completions.create(
                model=model, prompt="A fox", max_tokens=16, temperature=0.8, seed=5
            )
            .choices[0]
            .text
        )

    # One sampler for every backend: same logits and seed, same tokens.
    assert sample("tinylm-fp32") == sample("tinylm-hf") == sample("tinylm-gguf")
