"""One deadline rule on a live server (default 0.5 s, maximum 1.5 s): the same caller
timeout over KServe REST and gRPC gives the same result, a told turn that runs past the
default is stopped and counted, and an OpenAI request is bounded by the default."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from agentd.testing import RunningServer, start_server
from agentd.testing.models import write_mlp_model
from tests.conftest import metric_value

DEFAULT_S = 0.5
MAX_S = 1.5
SLOW_BATCH_S = 3.0  # a lone call to a `slow-*` model waits this long for its batch to fill
# One slow model per call: a call that gave up leaves its batch window open behind it,
# which a later call to the same model would join.
SLOW_MODELS = [
    *(
        f"slow-{case}-{proto}"
        for case in ("default", "caller", "capped")
        for proto in ("rest", "grpc")
    ),
    "slow-grpc-deadline",
]
SLACK_S = 1.0  # timers fire late on a loaded 2-core machine; well under SLOW_BATCH_S - MAX_S
TINYLM = Path(__file__).resolve().parents[2] / "src" / "agentd" / "models" / "tinylm"

AGENTS = '''
import asyncio

from agentd import Agent, Message


class Relay(Agent):
    """Tells the sleeper named in the message to sleep; answers at once."""

    name = "relay"

    async def handle(self, ctx, message):
        target, seconds = message.text.split()
        await ctx.send(f"sleeper/{target}", Message(text=seconds))
        return "sent"


class Sleeper(Agent):
    name = "sleeper"

    async def handle(self, ctx, message):
        if message.text == "peek":
            return str(ctx.state.get("slept", 0))
        ctx.state["slept"] = ctx.state.get("slept", 0) + 1
        await asyncio.sleep(float(message.text))
        return "slept"
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    plugins = tmp_path_factory.mktemp("plugins")
    (plugins / "agents").mkdir()
    (plugins / "agents" / "deadline_agents.py").write_text(AGENTS)
    models = plugins / "models"
    for name in SLOW_MODELS:
        write_mlp_model(models, name, max_queue_delay_us=int(SLOW_BATCH_S * 1e6))
    # tinylm whose end token is one it never picks: it writes until max_tokens.
    endless = models / "endless"
    endless.mkdir()
    shutil.copy(TINYLM / "model.onnx", endless / "model.onnx")
    shutil.copy(TINYLM / "tokenizer.json", endless / "tokenizer.json")
    config = {
        "name": "endless",
        "kind": "language-model",
        "platform": "onnxruntime",
        "context_length": 1024,
        "eos_token_ids": [5],
        "kv_cache": {"block_size": 16, "blocks": 128},
    }
    (endless / "config.yaml").write_text(yaml.safe_dump(config))
    running = start_server(
        ["--plugins", str(plugins)],
        env={"AGENTD_DEFAULT_TIMEOUT_S": str(DEFAULT_S), "AGENTD_MAX_TIMEOUT_S": str(MAX_S)},
        timeout=90,
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def grpc_client(server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.target)
    yield client
    client.close()


def _input(model: str) -> str:
    return "features" if model == "decision" else "input"


def _model(model: str, case: str, protocol: str) -> str:
    return f"slow-{case}-{protocol}" if model == "slow" else model


def _rest(http: httpx.Client, model: str, micros: int | None) -> tuple[str, float]:
    doc: dict = {"inputs": [{"name": _input(model), "datatype": "FP32", "shape": [1, 16]}]}
    doc["inputs"][0]["data"] = [0.5] * 16
    if micros is not None:
        doc["parameters"] = {"timeout": micros}
    started = time.monotonic()
    response = http.post(f"/v2/models/{model}/infer", content=orjson.dumps(doc))
    elapsed = time.monotonic() - started
    outcome = {200: "ok", 504: "deadline"}.get(response.status_code, response.text)
    return outcome, elapsed


def _grpc(
    client: grpcclient.InferenceServerClient, model: str, micros: int | None
) -> tuple[str, float]:
    tensor = grpcclient.InferInput(_input(model), [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), 0.5, dtype=np.float32))
    started = time.monotonic()
    try:
        client.infer(model, [tensor], timeout=micros)  # no grpc-timeout: a caller without one
        outcome = "ok"
    except InferenceServerException as exc:
        outcome = "deadline" if exc.status() == "StatusCode.DEADLINE_EXCEEDED" else str(exc)
    return outcome, time.monotonic() - started


@pytest.mark.parametrize(
    ("model", "micros", "outcome", "after_s"),
    [
        ("slow", None, "deadline", DEFAULT_S),  # no caller timeout: the default
        ("slow", 100_000, "deadline", 0.1),  # the caller's own, shorter one
        ("slow", 30_000_000, "deadline", MAX_S),  # past the maximum: cut to it
        ("decision", 30_000_000, "ok", 0.0),  # a model that answers in time
    ],
    ids=["default", "caller", "capped", "in-time"],
)
def test_the_same_caller_timeout_gives_the_same_result_over_rest_and_grpc(
    request, http, grpc_client, model, micros, outcome, after_s
):
    case = request.node.callspec.id
    results = {
        "rest": _rest(http, _model(model, case, "rest"), micros),
        "grpc": _grpc(grpc_client, _model(model, case, "grpc"), micros),
    }
    for protocol, (got, elapsed) in results.items():
        assert got == outcome, (protocol, got)
        if outcome == "deadline":
            # At its deadline: not before, and not when the batch finally ran.
            assert after_s - 0.05 <= elapsed < after_s + SLACK_S, (protocol, elapsed)


def test_a_grpc_call_deadline_past_the_maximum_is_cut_to_it(grpc_client):
    tensor = grpcclient.InferInput("input", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.full((1, 16), 0.5, dtype=np.float32))
    started = time.monotonic()
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.infer("slow-grpc-deadline", [tensor], client_timeout=30)  # grpc-timeout
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert MAX_S - 0.05 <= time.monotonic() - started < MAX_S + SLACK_S


def _invoke(http: httpx.Client, agent: str, text: str, timeout_ms: int = 1400) -> str:
    response = http.post(
        "/agentd.v1.AgentService/Invoke",
        json={"agent": agent, "message": {"text": text}},
        headers={"connect-timeout-ms": str(timeout_ms)},
    )
    assert response.status_code == 200, response.text
    return response.json()["message"]["text"]


def _deadline_turns(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    return metric_value(text, "agentd_agent_turns_total", agent_type="sleeper", outcome="deadline")


def test_a_told_turn_past_the_default_deadline_is_stopped_and_counted(http):
    before = _deadline_turns(http)
    started = time.monotonic()
    assert _invoke(http, "relay/r", "told 30") == "sent"
    while _deadline_turns(http) == before:
        assert time.monotonic() - started < DEFAULT_S + 5, "the told turn was not stopped"
        time.sleep(0.05)
    assert _deadline_turns(http) == before + 1
    # Stopped, not finished: its state change was rolled back, and the agent serves on.
    assert _invoke(http, "sleeper/told", "peek") == "0"


def test_an_openai_request_is_bounded_by_the_server_default(server, http):
    body = {"model": "endless", "prompt": "One, two,", "max_tokens": 1000, "temperature": 0}
    started = time.monotonic()
    response = http.post("/v1/completions", json=body)
    assert time.monotonic() - started < DEFAULT_S + SLACK_S
    assert response.status_code == 504, response.text[:200]
    error = response.json()["error"]
    assert error["code"] == "deadline_exceeded" and error["type"] == "server_error"
    assert "did not finish before the deadline" in error["message"]
    # Streaming: the 200 is out, so the deadline ends the stream with an error event.
    started = time.monotonic()
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
        assert stream.status_code == 200
        raw = stream.read()
    assert time.monotonic() - started < DEFAULT_S + SLACK_S
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    error = orjson.loads(events[-3].removeprefix(b"data: "))["error"]
    assert error["code"] == "deadline_exceeded"
