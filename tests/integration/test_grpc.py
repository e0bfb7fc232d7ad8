"""The agent API through a stock grpcio client over h2c."""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import httpx
import pytest

from agentd.v1 import agent_pb2 as pb
from agentd.v1 import agent_pb2_grpc as pb_grpc
from tests.conftest import metric_value


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.AgentServiceStub:
    return pb_grpc.AgentServiceStub(channel)


def raw_method(channel: grpc.Channel, path: str):
    """A unary method that sends and receives raw bytes, to send what stubs cannot."""
    return channel.unary_unary(
        path, request_serializer=lambda b: b, response_deserializer=lambda b: b
    )


def invoke(stub, agent: str, text: str = "", **kwargs):
    return stub.Invoke(pb.InvokeRequest(agent=agent, message=pb.Message(text=text)), **kwargs)


def test_invoke_echo_returns_message_and_address(stub):
    request = pb.InvokeRequest(
        agent="echo/abc",
        message=pb.Message(text="hello", data=b"\x00\x01", metadata={"k": "v"}),
    )
    response = stub.Invoke(request)
    assert response.agent == "echo/abc"
    assert response.message == request.message


def test_bare_type_addresses_default_instance(stub):
    assert invoke(stub, "echo", "x").agent == "echo/default"


def test_invoke_stream_yields_words_in_order(stub):
    events = list(
        stub.InvokeStream(pb.InvokeRequest(agent="echo", message=pb.Message(text="one two three")))
    )
    assert [e.token for e in events] == ["one ", "two ", "three"]
    assert [e.index for e in events] == [0, 1, 2]


def test_list_agents_shows_builtin_and_plugin_types(stub):
    invoke(stub, "echo/listed")
    agents = {a.name: a for a in stub.ListAgents(pb.ListAgentsRequest()).agents}
    assert {"echo", "slow", "boom", "counter"} <= set(agents)
    assert agents["echo"].streaming and not agents["slow"].streaming
    assert agents["echo"].active_instances >= 1


def test_unknown_agent_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, "nosuchagent")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nosuchagent" in err.value.details()


@pytest.mark.parametrize("address", ["Bad Type", "echo/", "echo/has space", "", "x" * 65])
def test_malformed_address_is_invalid_argument(stub, address):
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, address)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_protobuf_is_invalid_argument(channel):
    raw = raw_method(channel, "/agentd.v1.AgentService/Invoke")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\x0a\xff\xff\xff\xff\x0f")  # field 1, length far past the end
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed protobuf" in err.value.details()


def test_agent_error_is_internal_without_stack(stub):
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, "boom")
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "kaboom" in err.value.details()
    assert "Traceback" not in err.value.details()


def test_deadline_exceeded_cancels_the_turn(stub, server):
    def stopped_turns() -> float:
        # The server's deadline and the client's cancellation race; either stops the turn.
        return _turns(server, "slow", "deadline") + _turns(server, "slow", "cancelled")

    before = stopped_turns()
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, "slow/deadline", "5", timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server stopped the agent's turn instead of letting it run on for 5 s.
    end = time.monotonic() + 3
    while stopped_turns() < before + 1 and time.monotonic() < end:
        time.sleep(0.02)
    assert stopped_turns() == before + 1
    # And the instance is free again at once (its turn is over).
    assert invoke(stub, "slow/deadline", "0").message.text == "done"


def test_oversized_message_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as err:
        invoke(stub, "echo", "x" * (2 * 1024 * 1024))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert invoke(stub, "echo", "still fine").message.text == "still fine"


def test_turns_of_one_instance_never_interleave(stub):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda _: invoke(stub, "counter/ordered").message.text, range(64)))
    assert sorted(int(r) for r in replies) == list(range(1, 65))


def test_bad_requests_do_not_disturb_concurrent_good_ones(stub, channel):
    raw = raw_method(channel, "/agentd.v1.AgentService/Invoke")

    def good(i: int) -> str:
        return invoke(stub, f"echo/{i}", f"m{i}").message.text

    def bad(i: int) -> grpc.StatusCode:
        try:
            if i % 3 == 0:
                raw(b"\xff\xff\xff")
            elif i % 3 == 1:
                invoke(stub, "boom")
            else:
                invoke(stub, "slow", "5", timeout=0.05)
        except grpc.RpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        goods = pool.map(good, range(100))
        bads = list(pool.map(bad, range(30)))
        assert list(goods) == [f"m{i}" for i in range(100)]
    assert grpc.StatusCode.OK not in bads


def test_unknown_method_is_unimplemented(channel):
    raw = raw_method(channel, "/agentd.v1.AgentService/Nope")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"")
    assert err.value.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)


def _turns(server, agent_type: str, outcome: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "agentd_agent_turns_total", agent_type=agent_type, outcome=outcome)


def test_stream_deadline_exceeded(stub, server):
    before = _turns(server, "ticker", "deadline")
    events = []
    with pytest.raises(grpc.RpcError) as err:
        for event in stub.InvokeStream(
            pb.InvokeRequest(agent="ticker/d", message=pb.Message(text="100")), timeout=0.4
        ):
            events.append(event.token)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= len(events) < 100
    assert _turns(server, "ticker", "deadline") == before + 1


def test_client_cancelling_a_stream_ends_the_turn(stub, server):
    before = _turns(server, "ticker", "cancelled")
    call = stub.InvokeStream(pb.InvokeRequest(agent="ticker/c", message=pb.Message(text="1000")))
    assert next(call).token == "tick 0"
    call.cancel()
    # The server notices the reset stream and closes the agent's generator.
    deadline = time.monotonic() + 5
    while _turns(server, "ticker", "cancelled") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _turns(server, "ticker", "cancelled") == before + 1
    # The instance is free again.
    events = stub.InvokeStream(pb.InvokeRequest(agent="ticker/c", message=pb.Message(text="2")))
    assert [e.token for e in events] == ["tick 0", "tick 1"]
