"""The OpenAI-compatible API on a real server, driven by the ``openai`` package."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import grpc
import httpx
import openai
import orjson
import pytest

from agentd.v1 import agent_pb2, agent_pb2_grpc
from tests.conftest import metric_value

MODEL = "tinylm"
QUESTION = [{"role": "user", "content": "what colour is the sky?"}]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
async def aclient(server):
    async with openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0
    ) as async_client:
        yield async_client


def test_models_lists_the_builtin_language_model(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    assert client.models.retrieve(MODEL).owned_by == "agentd"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


def test_completion_and_its_stream_agree(client):
    kwargs = {"model": MODEL, "prompt": "A bee has", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**kwargs)
    choice = whole.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    pieces = list(client.completions.create(**kwargs, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == choice.text
    assert pieces[-1].choices[0].finish_reason == choice.finish_reason


def test_max_tokens_reports_length(client):
    result = client.completions.create(model=MODEL, prompt="One, two,", max_tokens=3, temperature=0)
    assert result.usage.completion_tokens == 3
    assert result.choices[0].finish_reason == "length"


def test_chat_answers_and_streams_the_same_text(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=24, temperature=0
    )
    message = whole.choices[0].message
    assert message.role == "assistant"
    assert "blue" in message.content.lower()
    assert whole.choices[0].finish_reason == "stop"  # ended at <|end|>, not by the limit
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_ends_with_done(server):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_stop_sequences_cut_the_text(client):
    free = (
        client.completions.create(model=MODEL, prompt="The sky is", max_tokens=20, temperature=0)
        .choices[0]
        .text
    )
    stop = free.strip().split(" ")[1]
    cut = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=20, temperature=0, stop=[stop]
    ).choices[0]
    assert cut.text == free[: free.index(stop)]
    assert cut.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt="A fox", max_tokens=24, temperature=1.0, top_p=0.95, seed=seed
            )
            .choices[0]
            .text
        )

    assert sample(11) == sample(11)
    assert len({sample(11), sample(12), sample(13)}) > 1


async def test_32_concurrent_streams_match_their_solo_answers(aclient):
    prompts = [f"what is {i} plus {i % 5}?" for i in range(32)]

    async def ask(prompt: str) -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    together = await asyncio.wait_for(asyncio.gather(*(ask(p) for p in prompts)), 120)
    alone = [await ask(p) for p in prompts[:4]]
    assert together[:4] == alone
    assert all(together)


def test_a_client_that_leaves_mid_stream_frees_its_blocks(client, http):
    text = _settled(http)
    total = metric_value(text, "agentd_lm_kv_blocks_free", model=MODEL)
    assert total > 0
    before = metric_value(text, "agentd_lm_sequences_total", model=MODEL, reason="cancelled")
    # The tiny model says all it has to say in ~35 tokens, a few ms: a cut can come after
    # its end. Cut until one lands mid-generation (the first almost always does).
    for seed in range(1, 11):
        stream = client.completions.create(
            model=MODEL, prompt="Once", max_tokens=900, temperature=0.7, seed=seed, stream=True
        )
        for received, _ in enumerate(stream, start=1):
            if received == 3:
                break
        stream.close()
        text = _settled(http)
        cancelled = metric_value(text, "agentd_lm_sequences_total", model=MODEL, reason="cancelled")
        if cancelled > before:
            break
    assert metric_value(text, "agentd_lm_kv_blocks_used", model=MODEL) == 0
    assert metric_value(text, "agentd_lm_kv_blocks_free", model=MODEL) == total
    assert cancelled > before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": "hot"}, "temperature"),
        ({"stop": [1, 2]}, "stop"),
        ({"n": 17}, "n"),
        ({"seed": -1}, "seed"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"prompt": "word " * 3000}, "prompt"),
        ({"prompt": "a b " * 100_000}, "prompt"),  # refused by length, before tokenizing
        ({"prompt": None}, "prompt"),
    ],
)
def test_bad_completion_parameters_are_400_naming_the_field(client, body, param):
    request = {"model": MODEL, "prompt": "hi", **body}
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(**request)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param
    assert param in caught.value.body["message"]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("not a list", "messages"),
        ([], "messages"),
        ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
    ],
)
def test_bad_chat_messages_are_400(http, messages, param):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"


def test_unknown_model_and_malformed_bodies(http):
    response = http.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    response = http.post(
        "/v1/completions", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert http.get("/v1/completions").status_code == 405
    assert http.post("/v1/models", json={}).status_code == 405
    too_big = http.post(  # the server under test takes bodies up to 1 MiB
        "/v1/completions", json={"model": MODEL, "prompt": "x" * (2 * 1024 * 1024)}
    )
    assert too_big.status_code == 413
    assert "larger than" in too_big.json()["error"]["message"]


def test_agents_stream_tokens_through_invoke_stream(channel):
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = agent_pb2.InvokeRequest(
        agent="chat/streamer", message=agent_pb2.Message(text="what colour is grass?")
    )
    events = list(stub.InvokeStream(request, timeout=30))
    tokens = [e.token for e in events if e.WhichOneof("payload") == "token"]
    assert len(tokens) > 1
    assert "green" in "".join(tokens).lower()
    assert [e.index for e in events] == list(range(len(events)))


def test_chat_agent_with_an_unknown_model_is_not_found_and_stays_usable(channel):
    stub = agent_pb2_grpc.AgentServiceStub(channel)

    def say(text: str) -> str:
        request = agent_pb2.InvokeRequest(agent="chat/memo", message=agent_pb2.Message(text=text))
        return stub.Invoke(request, timeout=30).message.text

    first = say("hello")
    assert first
    try:
        stub.Invoke(
            agent_pb2.InvokeRequest(
                agent="chat/memo",
                message=agent_pb2.Message(text="hi", metadata={"model": "nope"}),
            ),
            timeout=30,
        )
    except grpc.RpcError as exc:
        assert exc.code() is grpc.StatusCode.NOT_FOUND
    else:
        pytest.fail("an unknown model must be NOT_FOUND")
    assert say("what is 2 plus 2?")


def test_an_agent_prompt_over_the_context_is_invalid_argument(channel):
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = agent_pb2.InvokeRequest(
        agent="chat/verbose", message=agent_pb2.Message(text="word " * 3000)
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub.Invoke(request, timeout=30)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in caught.value.details()


def test_finished_and_abandoned_requests_leave_no_errors_in_the_server_log(client, server, channel):
    # Disconnect watchers (ours for OpenAI streams, connect-python's for gRPC streams) stop
    # waiting on a receive when the response finishes first, and a client leaving a stream
    # cuts off a pending send; the server still completes both, and logged
    # InvalidStateError for each such request until the app got futures of its own.
    client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4, stream=True))
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = agent_pb2.InvokeRequest(agent="echo", message=agent_pb2.Message(text="a b c"))
    assert len(list(stub.InvokeStream(request, timeout=30))) == 3
    for _ in range(3):
        left = client.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=200, stream=True
        )
        next(iter(left))
        left.close()
    time.sleep(1.0)  # the server completes the abandoned futures after the responses
    assert "InvalidStateError" not in server.log()


def _cut_stream(server, path: str, body: dict, mode: int) -> None:
    """Open a streaming request on a raw socket and leave at a point given by ``mode``:
    0 after the first event, 1 right after sending, 2 after the first bytes of the
    response, 3 with a reset (SO_LINGER 0) after the first event."""
    data = orjson.dumps(body)
    content_type = "application/connect+json" if path.startswith("/agentd") else "application/json"
    if content_type == "application/connect+json":
        data = b"\x00" + len(data).to_bytes(4, "big") + data
    head = (
        f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: {content_type}\r\n"
        f"content-length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=30) as sock:
        sock.sendall(head.encode() + data)
        if mode == 1:
            return
        received = b""
        while (mode == 2 and not received) or (mode != 2 and b"\n\n" not in received):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            if content_type == "application/connect+json" and len(received) > 200:
                break
        if mode == 3:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _settled(http: httpx.Client) -> str:
    """/metrics once no sequence is active or waiting and no KV block is in use."""
    deadline = time.monotonic() + 30
    while True:
        text = http.get("/metrics").text
        busy = sum(
            metric_value(text, name, model=MODEL)
            for name in ("agentd_lm_sequences_active", "agentd_lm_sequences_waiting")
        ) + metric_value(text, "agentd_lm_kv_blocks_used", model=MODEL)
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_200_streams_cut_by_clients_leave_no_trace(server, http, channel):
    # Each cut OpenAI stream used to log "Task exception was never retrieved" with a
    # traceback that kept the frames of every earlier cut (the server raises one shared
    # exception object): logs and memory grew with each client that left.
    before = metric_value(
        _settled(http), "agentd_lm_sequences_total", model=MODEL, reason="cancelled"
    )
    start = len(server.output)
    long = {"model": MODEL, "max_tokens": 400, "temperature": 0.8, "stream": True}
    for i in range(200):
        if i % 2:
            body = {**long, "prompt": f"Once upon a time {i}"}
            _cut_stream(server, "/v1/completions", body, i % 4)
        else:
            body = {**long, "messages": [{"role": "user", "content": f"story {i}"}]}
            _cut_stream(server, "/v1/chat/completions", body, i % 4)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    for i in range(20):
        call = stub.InvokeStream(
            agent_pb2.InvokeRequest(
                agent="chat/cut", message=agent_pb2.Message(text=f"tell me a story {i}")
            ),
            timeout=30,
        )
        next(call)
        call.cancel()
        agent = {"agent": "chat/cut", "message": {"text": f"a long story {i}"}}
        _cut_stream(server, "/agentd.v1.AgentService/InvokeStream", agent, i % 4)
    text = _settled(http)
    assert metric_value(text, "agentd_lm_sequences_active", model=MODEL) == 0
    assert metric_value(text, "agentd_lm_kv_blocks_used", model=MODEL) == 0
    cancelled = metric_value(text, "agentd_lm_sequences_total", model=MODEL, reason="cancelled")
    # Cuts that land mid-generation stop it (many land after the tiny model's short answer).
    assert cancelled - before >= 20
    assert http.get("/healthz").status_code == 200
    done = http.post("/v1/completions", json={"model": MODEL, "prompt": "Still", "max_tokens": 4})
    assert done.status_code == 200 and done.json()["choices"][0]["text"]
    time.sleep(0.5)  # anything the loop would log about abandoned tasks comes now
    log = "".join(server.output[start:])
    assert "never retrieved" not in log
    assert "Traceback" not in log
    assert "ERROR" not in log
