"""An error in the middle of an OpenAI stream (after the 200 went out) ends the stream with
an OpenAI-shaped error event and ``data: [DONE]``, on a real server.

The failure is real: ``brokenlm`` is the built-in tinylm with its rotary position tables
cut to ``ROPE_ROWS`` positions, so onnxruntime refuses the decode step that reaches
position ``ROPE_ROWS`` ("position_ids value 32 ... is out of range") after the stream has
already carried the tokens before it. Its end-of-sequence token is ``<|pad|>``, which the
model never picks, so every generation runs into that step.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import onnx
import openai
import orjson
import pytest
import yaml
from onnx import numpy_helper

from agentd.testing import RunningServer, start_server

TINYLM = Path(__file__).resolve().parents[2] / "src" / "agentd" / "models" / "tinylm"
ROPE_ROWS = 32
BROKEN = "brokenlm"


def _broken_model(folder: Path) -> None:
    folder.mkdir(parents=True)
    graph = onnx.load(str(TINYLM / "model.onnx"))
    for table in graph.graph.initializer:
        if table.name in ("rope_cos", "rope_sin"):
            rows = numpy_helper.to_array(table)[:ROPE_ROWS].copy()
            table.CopyFrom(numpy_helper.from_array(rows, table.name))
    onnx.save(graph, str(folder / "model.onnx"))
    shutil.copy(TINYLM / "tokenizer.json", folder / "tokenizer.json")
    config = {
        "name": BROKEN,
        "kind": "language-model",
        "platform": "onnxruntime",
        "context_length": 1024,  # what the graph claims; its tables end at ROPE_ROWS
        "eos_token_ids": [5],  # <|pad|>: never generated, so no answer ends early
        "kv_cache": {"block_size": 16, "blocks": 64},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory) -> Iterator[RunningServer]:
    plugins = tmp_path_factory.mktemp("plugins")
    _broken_model(plugins / "models" / BROKEN)
    running = start_server(["--plugins", str(plugins)], timeout=90)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(lm_server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=lm_server.url + "/v1", api_key="-", max_retries=0) as c:
        yield c


def _events(body: bytes) -> list[bytes]:
    assert body.endswith(b"\n\n"), body[-200:]
    return [event.removeprefix(b"data: ") for event in body.split(b"\n\n")[:-1]]


@pytest.mark.parametrize(
    ("path", "request_body"),
    [
        ("/v1/completions", {"prompt": "One, two,"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "count to 50"}]}),
    ],
)
def test_a_mid_stream_failure_ends_with_an_error_event_and_done(lm_server, path, request_body):
    body = {**request_body, "model": BROKEN, "max_tokens": 200, "temperature": 0, "stream": True}
    with (
        httpx.Client(base_url=lm_server.url, timeout=60) as http,
        http.stream("POST", path, json=body) as response,
    ):
        assert response.status_code == 200
        raw = response.read()  # a clean end: no RemoteProtocolError, no reset
    events = _events(raw)
    assert events[-1] == b"[DONE]"
    *chunks, error_event = [orjson.loads(event) for event in events[:-1]]
    assert len(chunks) >= 5, "tokens before the failing step reached the client"
    assert all("choices" in chunk for chunk in chunks)
    error = error_event["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "server_error"
    assert error["code"] == "internal"
    assert f"model {BROKEN!r} failed" in error["message"]
    assert "out of range" in error["message"]


def test_the_openai_package_raises_api_error_after_the_tokens(client):
    stream = client.chat.completions.create(
        model=BROKEN,
        messages=[{"role": "user", "content": "count to 50"}],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    pieces: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces), "the text before the failure was delivered"
    assert f"model {BROKEN!r} failed" in caught.value.message
    assert caught.value.body["type"] == "server_error"  # type: ignore[index]
    assert caught.value.code == "internal"


def test_without_stream_the_failure_is_a_500_and_the_server_keeps_serving(client, lm_server):
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=BROKEN, prompt="One, two,", max_tokens=200, temperature=0)
    assert caught.value.status_code == 500
    assert f"model {BROKEN!r} failed" in caught.value.message
    # The built-in model on the same server is unaffected, streaming or not.
    whole = client.completions.create(model="tinylm", prompt="A bee has", max_tokens=8)
    assert whole.choices[0].text
    pieces = list(
        client.completions.create(model="tinylm", prompt="A bee", max_tokens=8, stream=True)
    )
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")
    # Nothing went wrong in the server itself: no second response start, no traceback.
    log = lm_server.log()
    assert "Traceback" not in log
    assert "http.response.start" not in log
