"""Embedding models (``kind: embedding``): a MiniLM-shaped BERT (6 layers, hidden 384, 12
heads, vocabulary 30,522) with random weights, exported by agentd's exporter, served by the
inference service (batched across callers, sequences padded to the batch's longest),
``/v1/embeddings`` on a real ``agentd serve`` (the openai package, float and base64), KServe
on the same model, ``ctx.embed`` from an agent. Reference: transformers' BertModel on the
same weights, then mean pooling over the attention mask and L2 normalisation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer

from agentd import Agent, Message
from agentd.agents import AgentRegistry
from agentd.errors import InvalidArgument, Unavailable
from agentd.gateway.openai.embeddings import parse_embedding
from agentd.gateway.openai.requests import RequestError
from agentd.inference import InferenceService, ModelRepository
from agentd.inference.config import parse_model_config
from agentd.inference.embedding import pool
from agentd.inference.embedding_export import export_bert, minilm_config, random_bert
from agentd.inference.onnx_runtime import OnnxLoader
from agentd.inference.repository import ModelState
from agentd.runtime import ActorHost, MemoryStateStore, Runtime, WorkerPool
from agentd.testing import RunningServer, start_server

NAME = "minilm"
MAX_TOKENS = 128
TEXTS = [
    "a",
    "the agent is a model",
    "embeddings of texts of different lengths, batched together by the micro-batcher!",
    "hello, world",
    "0123456789 " * 4,
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    """The reference BertModel and a plugins folder whose models/minilm holds its export."""
    plugins = tmp_path_factory.mktemp("plugins")
    model = random_bert(minilm_config(), seed=7)
    export_bert(model, plugins / "models" / NAME, max_tokens=MAX_TOKENS, max_queue_delay_us=20_000)
    return model, plugins


@pytest.fixture(scope="module")
def server(exported: tuple[object, Path]) -> RunningServer:
    running = start_server(["--plugins", str(exported[1])], timeout=90)
    yield running
    running.stop()


def _ids(plugins: Path, texts: list[str]) -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(plugins / "models" / NAME / "tokenizer.json"))
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]


def _reference(model: object, ids: list[list[int]], *, normalize: bool = True) -> np.ndarray:
    """transformers on the same weights: one padded batch, mean pooling, normalised."""
    longest = max(map(len, ids))
    input_ids = np.zeros((len(ids), longest), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)], mask[i, : len(row)] = row, 1
    with torch.no_grad():
        hidden = model(  # type: ignore[operator]
            input_ids=torch.tensor(input_ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.zeros_like(torch.tensor(input_ids)),
        ).last_hidden_state.numpy()
    weights = mask[:, :, None].astype(np.float32)
    vectors = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    if normalize:
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors


@pytest.fixture(scope="module")
def reference(exported: tuple[object, Path]) -> np.ndarray:
    model, plugins = exported
    return _reference(model, _ids(plugins, TEXTS))


async def _service(plugins: Path, name: str = NAME) -> InferenceService:
    service = InferenceService(ModelRepository([OnnxLoader()], [plugins / "models"]))
    await service.start()
    assert service.entry(name).state is ModelState.READY, service.entry(name).reason
    return service


async def test_concurrent_callers_match_transformers_mean_pooling(
    exported: tuple[object, Path], reference: np.ndarray
) -> None:
    service = await _service(exported[1])
    try:
        # One caller per text, at once: the batcher pads them into shared runs, and each
        # caller gets its own row back.
        results = await asyncio.gather(*(service.embeddings.embed(NAME, [t]) for t in TEXTS))
        got = np.concatenate([r.vectors for r in results])
        assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
        np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
        stats = service.batcher(NAME).stats  # type: ignore[union-attr]
        assert stats.requests_run == len(TEXTS) and stats.runs < len(TEXTS)
        # One call with every text, and the same texts as token ids: the same vectors.
        whole = await service.embeddings.embed(NAME, TEXTS)
        np.testing.assert_allclose(whole.vectors, reference, atol=1e-4, rtol=0)
        ids = _ids(exported[1], TEXTS)
        assert whole.prompt_tokens == sum(map(len, ids))
        by_ids = await service.embeddings.embed(NAME, ids)
        np.testing.assert_allclose(by_ids.vectors, reference, atol=1e-4, rtol=0)
        # Past max_tokens: refused, naming the input (the model does not truncate).
        with pytest.raises(InvalidArgument, match=f"input 1 is .* at most {MAX_TOKENS}"):
            await service.embeddings.embed(NAME, ["a", "word " * MAX_TOKENS])
    finally:
        await service.aclose()


async def test_truncate_cls_pooling_unnormalised(
    exported: tuple[object, Path], tmp_path: Path
) -> None:
    """The same encoder configured with truncate: true (max_tokens 8), cls pooling and no
    normalisation: a long text is cut to [CLS] + 6 tokens + [SEP] instead of refused."""
    model, plugins = exported
    source, folder = plugins / "models" / NAME, tmp_path / "models" / "minilm-cut"
    folder.mkdir(parents=True)
    (folder / "model.onnx").symlink_to(source / "model.onnx")
    shutil.copy(source / "tokenizer.json", folder)
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["name"] = "minilm-cut"
    config["embedding"].update(truncate=True, max_tokens=8, pooling="cls", normalize=False)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    service = await _service(tmp_path, "minilm-cut")
    try:
        got = await service.embeddings.embed("minilm-cut", [TEXTS[2]])
        assert service.embeddings.names() == ["minilm-cut"]
        await service.unload("minilm-cut")  # no longer listed; a call is UNAVAILABLE
        assert service.embeddings.names() == []
        with pytest.raises(Unavailable, match="not loaded"):
            await service.embeddings.embed("minilm-cut", ["x"])
    finally:
        await service.aclose()
    ids = _ids(plugins, [TEXTS[2]])[0]
    cut = [*ids[:7], ids[-1]]
    assert got.prompt_tokens == 8
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([cut])).last_hidden_state.numpy()  # type: ignore[operator]
    np.testing.assert_allclose(got.vectors, hidden[:, 0], atol=1e-4, rtol=0)


def test_cls_pooling_and_no_normalisation() -> None:
    hidden = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(pool(hidden, mask, "cls", False), hidden[:, 0])
    mean = pool(hidden, mask, "mean", False)
    np.testing.assert_allclose(mean[0], hidden[0, :2].mean(0), rtol=1e-6)
    assert np.allclose(np.linalg.norm(pool(hidden, mask, "mean", True), axis=1), 1)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"pooling": "max"}, "pooling"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"normalise": True}, "normalise"),
    ],
)
def test_a_bad_embedding_config_names_the_field(section: dict, field: str) -> None:
    document = {"kind": "embedding", "max_batch_size": 8, "embedding": section}
    with pytest.raises(InvalidArgument, match=field):
        parse_model_config(document, Path("m/config.yaml"), "m")


def test_openai_package_float_and_base64(
    server: RunningServer, exported: tuple[object, Path], reference: np.ndarray
) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    floats = client.embeddings.create(model=NAME, input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)
    np.testing.assert_allclose(got, reference, atol=1e-4, rtol=0)
    assert [d.index for d in floats.data] == list(range(len(TEXTS)))
    assert floats.usage.prompt_tokens == sum(map(len, _ids(exported[1], TEXTS)))
    # The package asks for base64 unless told otherwise, and decodes it itself.
    default = client.embeddings.create(model=NAME, input=TEXTS)
    np.testing.assert_array_equal(np.array([d.embedding for d in default.data]), got)
    raw = httpx.post(
        f"{server.url}/v1/embeddings",
        json={"model": NAME, "input": TEXTS[1], "encoding_format": "base64", "dimensions": 384},
        timeout=30,
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, got[1])
    single = client.embeddings.create(model=NAME, input=_ids(exported[1], TEXTS[:1])[0])
    np.testing.assert_allclose(single.data[0].embedding, reference[0], atol=1e-4, rtol=0)
    listed = {m.id: m for m in client.models.list().data}
    assert listed[NAME].model_extra["kind"] == "embedding"
    assert listed[NAME].model_extra["dimensions"] == 384


async def test_concurrent_requests_get_their_own_vectors(
    server: RunningServer, reference: np.ndarray
) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        replies = await asyncio.gather(
            *(http.post("/v1/embeddings", json={"model": NAME, "input": t}) for t in TEXTS * 3)
        )
    for index, reply in enumerate(replies):
        assert reply.status_code == 200, reply.text
        vector = reply.json()["data"][0]["embedding"]
        np.testing.assert_allclose(vector, reference[index % len(TEXTS)], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": NAME}, "input"),
        ({"model": NAME, "input": ""}, "input"),
        ({"model": NAME, "input": []}, "input"),
        ({"model": NAME, "input": [1, "a"]}, "input"),
        ({"model": NAME, "input": [[1], []]}, "input"),
        ({"model": NAME, "input": [101, 30522]}, "input"),
        ({"model": NAME, "input": "word " * MAX_TOKENS}, "input"),
        ({"model": NAME, "input": ["x"] * 2049}, "input"),
        ({"model": NAME, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": NAME, "input": "x", "dimensions": 128}, "dimensions"),
        ({"model": NAME, "input": "x", "dimensions": "384"}, "dimensions"),
        ({"model": NAME, "input": [[1.5]]}, "input"),
        ({"model": NAME, "input": [True, 101]}, "input"),
        ({"model": NAME, "input": [-1]}, "input"),
        ({"model": NAME, "input": [2**70]}, "input"),
        ({"model": NAME, "input": {"text": "x"}}, "input"),
        ({"model": 7, "input": "x"}, "model"),
        ({"model": NAME, "input": "x", "user": 1}, "user"),
    ],
)
def test_bad_requests_are_400s_naming_the_param(
    server: RunningServer, body: dict, param: str
) -> None:
    reply = httpx.post(f"{server.url}/v1/embeddings", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] or param == "input"


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=12,
    )
)
def test_any_json_parses_or_is_a_request_error(data: object) -> None:
    for body in (
        data,
        {"model": NAME, "input": data},
        {"model": NAME, "input": "x", "dimensions": data},
    ):
        with contextlib.suppress(RequestError):
            parse_embedding(body)


def test_non_object_bodies_are_400s(server: RunningServer) -> None:
    for body in (b"[]", b'"x"', b"7", b"null", b"{"):
        reply = httpx.post(f"{server.url}/v1/embeddings", content=body, timeout=30)
        assert reply.status_code == 400, (body, reply.text)


@pytest.mark.parametrize("model", ["no-such-model", "decision", "tinylm"])
def test_unknown_or_other_models_are_404_model_not_found(server: RunningServer, model: str) -> None:
    reply = httpx.post(
        f"{server.url}/v1/embeddings", json={"model": model, "input": "x"}, timeout=30
    )
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["code"] == "model_not_found"


def test_kserve_serves_the_encoder(
    server: RunningServer, exported: tuple[object, Path], reference: np.ndarray
) -> None:
    ids = _ids(exported[1], TEXTS[1:2])
    shape = [1, len(ids[0])]
    inputs = [
        {"name": name, "datatype": "INT64", "shape": shape, "data": data}
        for name, data in [
            ("input_ids", ids[0]),
            ("attention_mask", [1] * shape[1]),
            ("token_type_ids", [0] * shape[1]),
        ]
    ]
    reply = httpx.post(f"{server.url}/v2/models/{NAME}/infer", json={"inputs": inputs}, timeout=30)
    assert reply.status_code == 200, reply.text
    out = reply.json()["outputs"][0]
    assert out["name"] == "last_hidden_state" and out["shape"] == [*shape, 384]
    hidden = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    vector = hidden.mean(1)[0]
    np.testing.assert_allclose(vector / np.linalg.norm(vector), reference[1], atol=1e-4)


class Librarian(Agent):
    name = "librarian"

    async def handle(self, ctx, message):
        vectors = await ctx.embed(message.text.split("|"), model=NAME)
        return ",".join(f"{v:.6f}" for v in vectors.ravel())


async def test_ctx_embed_from_an_agent(
    exported: tuple[object, Path], reference: np.ndarray
) -> None:
    service = await _service(exported[1])
    registry = AgentRegistry()
    registry.register(Librarian)
    host = ActorHost(registry, MemoryStateStore(), pool=WorkerPool(2, 8), inference=service)
    runtime = Runtime(host)
    await runtime.start()
    try:
        _, reply = await runtime.invoke("librarian/a", Message(text="|".join(TEXTS[:2])))
    finally:
        await runtime.aclose()
        await service.aclose()
    got = np.array([float(x) for x in reply.text.split(",")]).reshape(2, 384)
    np.testing.assert_allclose(got, reference[:2], atol=1e-4, rtol=0)
