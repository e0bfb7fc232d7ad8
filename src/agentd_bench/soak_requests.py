"""The soak's requests: one coroutine per kind of traffic, with real clients, and how each
outcome is counted.

Outcomes: ``ok``; ``cut`` (a stream this client left on purpose); ``server_errors`` (HTTP 5xx,
gRPC INTERNAL/UNKNOWN/UNAVAILABLE/DATA_LOSS/CANCELLED, a connection the server broke, a
wrong reply); ``timeouts``; ``rejected`` (429 / RESOURCE_EXHAUSTED: load shed, reported);
``client_errors`` (other 4xx: a mistake in this generator, reported).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import json
import random
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agentd_bench.soak_http import HttpPool, Response, TransportError

__all__ = [
    "KINDS",
    "MIX",
    "REQUEST_TIMEOUT_S",
    "Outcome",
    "Target",
    "Traffic",
    "Window",
]

MIX: dict[str, int] = {
    "grpc_unary": 20,
    "grpc_stream": 10,
    "json_unary": 20,
    "json_stream": 8,
    "kserve_rest": 10,
    "kserve_grpc": 10,
    "openai_stream": 6,
    "tool_call": 12,
    "tools_list": 4,
}
KINDS: tuple[str, ...] = (*MIX, "swarm")

REQUEST_TIMEOUT_S = 10.0
CUT_AFTER_CHUNKS = 2  # an OpenAI stream picked to be cut is left after this many chunks
GRPC_CHANNELS = 4
TEXT = "the quick brown fox jumps over the lazy dog"
FEATURES = [0.9, 0.8, 0.1, 0.5, 0.2, 0.7, 0.3, 0.4, 0.6, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
TOOL_CALLS: tuple[tuple[str, dict[str, Any], Callable[[Any], bool]], ...] = (
    ("calc", {"expression": "6 * 7"}, lambda r: r == 42),
    ("echo", {"value": "soak"}, lambda r: r == "soak"),
    ("text_stats", {"text": "a b b. c"}, lambda r: isinstance(r, dict)),
)
_GRPC_SERVER_CODES = frozenset({"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DATA_LOSS", "CANCELLED"})
_CONNECT_SERVER_CODES = frozenset({"internal", "unknown", "unavailable", "data_loss", "canceled"})
_EXAMPLES_PER_KIND = 3
_JSON = [("content-type", "application/json")]


class Outcome(enum.StrEnum):
    OK = "ok"
    CUT = "cut"
    SERVER_ERROR = "server_errors"
    TIMEOUT = "timeouts"
    REJECTED = "rejected"
    CLIENT_ERROR = "client_errors"


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def grpc(self) -> str:
        return f"{self.host}:{self.port}"


class Failed(Exception):
    """A request that did not succeed, with the outcome it counts as."""

    def __init__(self, outcome: Outcome, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.message = message


@dataclass(slots=True)
class KindWindow:
    counts: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def example(self, message: str) -> None:
        if len(self.examples) < _EXAMPLES_PER_KIND and message not in self.examples:
            self.examples.append(message[:300])

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts, "latencies": self.latencies, "examples": self.examples}


class Window:
    """What happened since the last report: per kind counts, latencies (s), examples."""

    def __init__(self) -> None:
        self.kinds: dict[str, KindWindow] = {}
        self.max_schedule_lag_s = 0.0

    def kind(self, name: str) -> KindWindow:
        found = self.kinds.get(name)
        if found is None:
            found = self.kinds[name] = KindWindow()
        return found

    def to_dict(self) -> dict[str, Any]:
        return {
            "kinds": {name: k.to_dict() for name, k in self.kinds.items()},
            "schedule_lag_ms": round(self.max_schedule_lag_s * 1000, 2),
        }


# ---------------------------------------------------------------- the requests


def _status_failure(status: int, body: bytes) -> Failed:
    text = body[:200].decode("utf-8", "replace")
    if status >= 500:
        return Failed(Outcome.SERVER_ERROR, f"HTTP {status}: {text}")
    if status == 429:
        return Failed(Outcome.REJECTED, f"HTTP 429: {text}")
    return Failed(Outcome.CLIENT_ERROR, f"HTTP {status}: {text}")


def _connect_failure(code: str, message: str) -> Failed:
    text = f"connect {code}: {message}"
    if code in _CONNECT_SERVER_CODES:
        return Failed(Outcome.SERVER_ERROR, text)
    if code == "deadline_exceeded":
        return Failed(Outcome.TIMEOUT, text)
    if code == "resource_exhausted":
        return Failed(Outcome.REJECTED, text)
    return Failed(Outcome.CLIENT_ERROR, text)


def _grpc_outcome(code_name: str) -> Outcome:
    if code_name in _GRPC_SERVER_CODES:
        return Outcome.SERVER_ERROR
    if code_name == "DEADLINE_EXCEEDED":
        return Outcome.TIMEOUT
    if code_name == "RESOURCE_EXHAUSTED":
        return Outcome.REJECTED
    return Outcome.CLIENT_ERROR


def _wrong(what: str, got: object) -> Failed:
    return Failed(Outcome.SERVER_ERROR, f"wrong reply to {what}: {str(got)[:200]}")


def _unframe(body: bytes) -> list[tuple[int, bytes]]:
    frames = []
    while len(body) >= 5:
        flags, size = struct.unpack(">BI", body[:5])
        frames.append((flags, body[5 : 5 + size]))
        body = body[5 + size :]
    return frames


class Traffic:
    """Real clients (grpcio aio stubs; HTTP/1.1 through :class:`HttpPool`) and one coroutine
    per kind of request."""

    def __init__(self, target: Target, seed: int) -> None:
        import grpc

        from agentd.kserve.v2 import grpc_service_pb2 as kpb
        from agentd.kserve.v2 import grpc_service_pb2_grpc as kgrpc
        from agentd.v1 import agent_pb2 as pb
        from agentd.v1 import agent_pb2_grpc

        self._pb, self._kpb = pb, kpb
        self._grpc = grpc
        # A connection for everything in flight, so a request never waits for the pool (that
        # wait would read as server latency); idle ones are kept to a few dozen.
        self.http = HttpPool(target.host, target.port, max_idle=64)
        self._channels = [grpc.aio.insecure_channel(target.grpc) for _ in range(GRPC_CHANNELS)]
        self._agents = [agent_pb2_grpc.AgentServiceStub(ch) for ch in self._channels]
        self._kserve = [kgrpc.GRPCInferenceServiceStub(ch) for ch in self._channels]
        self._counter = itertools.count()
        self._rng = random.Random(seed)
        self._kinds, self._weights = list(MIX), list(MIX.values())
        self._calls: dict[str, Callable[[int], Awaitable[Outcome]]] = {
            "grpc_unary": self._grpc_unary,
            "grpc_stream": self._grpc_stream,
            "json_unary": self._json_unary,
            "json_stream": self._json_stream,
            "kserve_rest": self._kserve_rest,
            "kserve_grpc": self._kserve_grpc,
            "openai_stream": self._openai_stream,
            "tool_call": self._tool_call,
            "tools_list": self._tools_list,
        }
        row = struct.pack("<16f", *FEATURES)
        self._infer_request = kpb.ModelInferRequest(
            model_name="decision",
            inputs=[
                kpb.ModelInferRequest.InferInputTensor(
                    name="features", datatype="FP32", shape=[1, 16]
                )
            ],
            raw_input_contents=[row],
        )
        self._infer_body = json.dumps(
            {
                "inputs": [
                    {"name": "features", "datatype": "FP32", "shape": [1, 16], "data": FEATURES}
                ]
            }
        ).encode()

    async def aclose(self) -> None:
        await self.http.aclose()
        for channel in self._channels:
            await channel.close()

    @property
    def num_connections(self) -> int:
        """TCP connections this client holds to the server now."""
        return self.http.num_open + GRPC_CHANNELS

    def pick(self) -> str:
        return self._rng.choices(self._kinds, self._weights)[0]

    async def attempt(
        self,
        kind: str,
        window: Callable[[], Window],
        call: Callable[[int], Awaitable[Outcome]] | None = None,
    ) -> Outcome:
        """Make one request of ``kind`` (or ``call``, counted as ``kind``) and count it in
        the window current when it ends."""
        window().kind(kind).add("sent")
        n = next(self._counter)
        started = time.perf_counter()
        message = ""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S + 2):
                outcome = await (call or self._calls[kind])(n)
        except Failed as exc:
            outcome, message = exc.outcome, exc.message
        except TimeoutError:
            outcome, message = Outcome.TIMEOUT, f"no answer in {REQUEST_TIMEOUT_S:g} s"
        except self._grpc.aio.AioRpcError as exc:
            code = exc.code().name
            outcome, message = _grpc_outcome(code), f"gRPC {code}: {exc.details()}"
        except TransportError as exc:
            outcome, message = Outcome.SERVER_ERROR, f"connection: {exc}"
        except Exception as exc:
            outcome, message = Outcome.SERVER_ERROR, f"unexpected {type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - started
        current = window().kind(kind)
        current.add(outcome.value)
        if outcome is Outcome.OK:
            current.latencies.append(elapsed)
        elif outcome is not Outcome.CUT:
            current.example(message)
        return outcome

    # Each returns OK (or CUT) or raises; ``n`` spreads calls over agents, tools, cuts.

    async def _post(
        self, target: str, body: bytes, content_type: str = "application/json"
    ) -> Response:
        """POST and read the whole answer; anything but 200 raises :class:`Failed`."""
        r = await self.http.request("POST", target, body, [("content-type", content_type)])
        if r.status != 200:
            raise _status_failure(r.status, r.body)
        return r

    async def _grpc_unary(self, n: int) -> Outcome:
        return await self.invoke_grpc(f"echo/soak-{n % 64}", n)

    async def invoke_grpc(self, agent: str, n: int) -> Outcome:
        pb = self._pb
        reply = await self._agents[n % GRPC_CHANNELS].Invoke(
            pb.InvokeRequest(agent=agent, message=pb.Message(text=TEXT)),
            timeout=REQUEST_TIMEOUT_S,
        )
        if reply.message.text != TEXT:
            raise _wrong("Invoke", reply)
        return Outcome.OK

    async def _grpc_stream(self, n: int) -> Outcome:
        pb = self._pb
        call = self._agents[n % GRPC_CHANNELS].InvokeStream(
            pb.InvokeRequest(agent=f"echo/soak-{n % 64}", message=pb.Message(text=TEXT)),
            timeout=REQUEST_TIMEOUT_S,
        )
        tokens = [event.token async for event in call]
        if "".join(tokens) != TEXT:
            raise _wrong("InvokeStream", tokens)
        return Outcome.OK

    async def _json_unary(self, n: int) -> Outcome:
        body = {"agent": f"echo/soak-{n % 64}", "message": {"text": TEXT}}
        r = await self._post("/agentd.v1.AgentService/Invoke", json.dumps(body).encode())
        if json.loads(r.body).get("message", {}).get("text") != TEXT:
            raise _wrong("Invoke (JSON)", r.body)
        return Outcome.OK

    async def _json_stream(self, n: int) -> Outcome:
        request = json.dumps({"agent": f"echo/soak-{n % 64}", "message": {"text": TEXT}})
        payload = request.encode()
        r = await self._post(
            "/agentd.v1.AgentService/InvokeStream",
            struct.pack(">BI", 0, len(payload)) + payload,
            content_type="application/connect+json",
        )
        frames = _unframe(r.body)
        if not frames or not frames[-1][0] & 2:
            raise Failed(Outcome.SERVER_ERROR, "Connect stream ended without its end frame")
        end = json.loads(frames[-1][1] or b"{}")
        if "error" in end:
            error = end["error"]
            raise _connect_failure(str(error.get("code")), str(error.get("message")))
        tokens = [json.loads(p).get("token", "") for flags, p in frames if not flags & 2]
        if "".join(tokens) != TEXT:
            raise _wrong("InvokeStream (Connect JSON)", tokens)
        return Outcome.OK

    async def _kserve_rest(self, n: int) -> Outcome:
        r = await self._post("/v2/models/decision/infer", self._infer_body)
        names = [o.get("name") for o in json.loads(r.body).get("outputs", [])]
        if "action" not in names:
            raise _wrong("KServe REST infer", r.body)
        return Outcome.OK

    async def _kserve_grpc(self, n: int) -> Outcome:
        reply = await self._kserve[n % GRPC_CHANNELS].ModelInfer(
            self._infer_request, timeout=REQUEST_TIMEOUT_S
        )
        if len(reply.raw_output_contents) != 2:
            raise _wrong("KServe gRPC ModelInfer", reply)
        return Outcome.OK

    async def _openai_stream(self, n: int) -> Outcome:
        cut = n % 3 == 2  # a third of the streams are left by the client mid-stream
        body = {
            "model": "tinylm",
            "messages": [{"role": "user", "content": "tell me a story"}],
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
        }
        chunks = 0
        request = json.dumps(body).encode()
        async with self.http.stream("POST", "/v1/chat/completions", request, _JSON) as r:
            if r.status != 200:
                raise _status_failure(r.status, await r.read())
            async for line in r.lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    return Outcome.OK
                if "error" in json.loads(data):
                    raise Failed(Outcome.SERVER_ERROR, f"error event: {data[:200]}")
                chunks += 1
                if cut and chunks >= CUT_AFTER_CHUNKS:
                    # Leaving the block closes the response unread: the connection drops
                    # mid-stream, as when a user closes the tab.
                    return Outcome.CUT
        raise Failed(Outcome.SERVER_ERROR, "SSE stream ended without data: [DONE]")

    async def _tool_call(self, n: int) -> Outcome:
        name, arguments, check = TOOL_CALLS[n % len(TOOL_CALLS)]
        if (n // len(TOOL_CALLS)) % 2 == 0:
            reply = await self._agents[n % GRPC_CHANNELS].CallTool(
                self._pb.CallToolRequest(name=name, arguments_json=json.dumps(arguments)),
                timeout=REQUEST_TIMEOUT_S,
            )
            result_json = reply.result_json
        else:
            request = {"name": name, "argumentsJson": json.dumps(arguments)}
            r = await self._post("/agentd.v1.AgentService/CallTool", json.dumps(request).encode())
            result_json = json.loads(r.body).get("resultJson", "null")
        if not check(json.loads(result_json)):
            raise _wrong(f"CallTool {name}", result_json)
        return Outcome.OK

    async def _tools_list(self, n: int) -> Outcome:
        r = await self.http.request("GET", "/v1/tools")
        if r.status != 200:
            raise _status_failure(r.status, r.body)
        if "calc" not in {t.get("name") for t in json.loads(r.body).get("tools", [])}:
            raise _wrong("GET /v1/tools", r.body)
        return Outcome.OK
