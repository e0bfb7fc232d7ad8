"""Sandboxed tools through a real server: GET /v1/tools, ListTools / CallTool over Connect
JSON and gRPC, error codes, hostile tools among concurrent calls, ctx.tool, the CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import httpx
import pytest

from agentd.testing import RunningServer, start_server
from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import metric_value
from tests.tools.support import LIMITS, PLUGINS, cache_dir, session_artefact

CALL = "/agentd.v1.AgentService/CallTool"


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    session_artefact(tmp_path_factory)  # built once per session; the server finds it cached
    env = {
        "AGENTD_TOOLS_CACHE_DIR": str(cache_dir(tmp_path_factory)),
        "AGENTD_TOOL_MAX_FUEL": str(LIMITS.max_fuel),
        "AGENTD_TOOL_MAX_MEMORY_BYTES": str(LIMITS.max_memory_bytes),
        "AGENTD_TOOL_TIMEOUT_S": str(LIMITS.timeout_s),
        "AGENTD_TOOL_MAX_OUTPUT_BYTES": str(LIMITS.max_output_bytes),
        "AGENTD_TOOL_MAX_INPUT_BYTES": str(LIMITS.max_input_bytes),
    }
    running = start_server(["--plugins", str(PLUGINS)], env=env)
    yield running
    running.stop()


@pytest.fixture
def client(tool_server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=tool_server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(tool_server: RunningServer) -> Iterator[pb_grpc.AgentServiceStub]:
    with grpc.insecure_channel(tool_server.target) as channel:
        yield pb_grpc.AgentServiceStub(channel)


def call(client: httpx.Client, name: str, arguments: object = None) -> httpx.Response:
    body = {"name": name}
    if arguments is not None:
        body["argumentsJson"] = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return client.post(CALL, json=body)


def test_get_v1_tools_lists_tools_with_schemas(client):
    r = client.get("/v1/tools")
    assert r.status_code == 200
    body = r.json()
    assert body["available"] is True
    tools = {t["name"]: t for t in body["tools"]}
    assert {"calc", "text_stats", "echo", "loop_forever"} <= set(tools)
    assert tools["calc"]["parameters"]["required"] == ["expression"]
    assert tools["calc"]["description"].startswith("Evaluate an arithmetic expression")


def test_list_and_call_over_grpc(stub):
    tools = {t.name: t for t in stub.ListTools(pb.ListToolsRequest()).tools}
    assert json.loads(tools["text_stats"].parameters_json)["properties"]["top"]["default"] == 10
    reply = stub.CallTool(
        pb.CallToolRequest(name="text_stats", arguments_json='{"text": "a b b", "top": 1}')
    )
    assert json.loads(reply.result_json)["top_words"] == [["b", 2]]


def test_call_over_connect_json(client):
    r = call(client, "calc", {"expression": "(1 + 2) * 14"})
    assert r.status_code == 200, r.text
    assert r.json() == {"resultJson": "42"}


ERRORS = [
    # tool, arguments, HTTP status, Connect code, message fragment
    ("no_such_tool", {}, 404, "not_found", "no tool named 'no_such_tool'"),
    ("add", {"a": "x"}, 400, "invalid_argument", "argument 'a' must be an integer"),
    ("add", "{not json", 400, "invalid_argument", "not valid JSON"),
    ("raise_error", {}, 500, "unknown", "raised ValueError: this tool always fails"),
    ("return_set", {}, 500, "unknown", "returned a value that is not JSON"),
    ("loop_forever", {}, 429, "resource_exhausted", "ran out of fuel"),
    ("allocate_4gib", {}, 429, "resource_exhausted", "ran out of memory"),
    ("return_100mb", {}, 429, "resource_exhausted", "more than the output limit"),
    ("recurse", {}, 429, "resource_exhausted", "recursed too deeply"),
    ("read_passwd", {}, 500, "unknown", "FileNotFoundError"),
    ("echo", {"value": "x" * 70_000}, 429, "resource_exhausted", "larger than the limit"),
]


@pytest.mark.parametrize(
    ("tool", "arguments", "status", "code", "fragment"), ERRORS, ids=[e[0] for e in ERRORS]
)
def test_errors_have_their_status_and_message(client, tool, arguments, status, code, fragment):
    r = call(client, tool, arguments)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code
    assert fragment in r.json()["message"]


def test_grpc_status_codes_and_deadline(stub):
    cases = {
        "no_such_tool": grpc.StatusCode.NOT_FOUND,
        "raise_error": grpc.StatusCode.UNKNOWN,
        "loop_forever": grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
    for name, code in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.CallTool(pb.CallToolRequest(name=name))
        assert info.value.code() is code
    with pytest.raises(grpc.RpcError) as info:
        stub.CallTool(
            pb.CallToolRequest(name="spin", arguments_json='{"iterations": 1000000000}'),
            timeout=0.3,
        )
    assert info.value.code() in (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # ran out of fuel first
    )


def test_hundred_concurrent_calls_with_a_hostile_one(tool_server, client):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tool_server.url, timeout=60) as ac:
            bodies = [
                {"name": "add", "argumentsJson": json.dumps({"a": i, "b": 1})} for i in range(99)
            ]
            bodies.insert(37, {"name": "loop_forever"})
            return await asyncio.gather(*(ac.post(CALL, json=b) for b in bodies))

    responses = asyncio.run(run())
    hostile = responses.pop(37)
    assert hostile.status_code == 429
    assert "ran out of fuel" in hostile.json()["message"]
    assert [r.status_code for r in responses] == [200] * 99
    assert [json.loads(r.json()["resultJson"]) for r in responses] == [i + 1 for i in range(99)]
    assert client.get("/healthz").status_code == 200
    assert call(client, "calc", {"expression": "1 + 1"}).json() == {"resultJson": "2"}


def test_metrics_count_tool_calls_and_errors(client):
    call(client, "raise_error", {})
    text = client.get("/metrics").text
    assert metric_value(text, "agentd_tool_calls_total", tool="calc", outcome="ok") >= 1
    assert metric_value(text, "agentd_tool_errors_total", tool="raise_error", kind="raised") >= 1
    assert metric_value(text, "agentd_tool_call_duration_seconds_count", tool="calc") >= 1
    assert metric_value(text, "agentd_tool_fuel_used_sum", tool="calc") > 0


def test_agents_call_tools_through_ctx_tool(client):
    invoke = "/agentd.v1.AgentService/Invoke"
    r = client.post(invoke, json={"agent": "tool-user", "message": {"text": "calc 2 + 3"}})
    assert r.json()["message"]["text"] == "calc = 5"
    r = client.post(invoke, json={"agent": "tool-user", "message": {"text": "raise_error"}})
    assert r.json()["message"]["text"] == (
        "ToolError: tool 'raise_error' raised ValueError: this tool always fails"
    )


def test_cli_lists_and_calls_tools(tool_server):
    def agentd(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agentd", "tools", *args, "--url", tool_server.url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    listed = agentd("list")
    assert listed.returncode == 0, listed.stderr
    assert "calc(expression)" in listed.stdout.splitlines()
    called = agentd("call", "calc", '{"expression": "2 ** 5"}')
    assert called.returncode == 0, called.stderr
    assert called.stdout.strip() == "32"
    failed = agentd("call", "raise_error")
    assert failed.returncode == 1
    assert "unknown: tool 'raise_error' raised ValueError" in failed.stderr
