import pytest

from agentd.gateway.detach import ClientGone
from agentd.gateway.observe import StatusRecorder


async def _noop(message):
    pass


async def test_grpc_status_from_trailers():
    rec = StatusRecorder(_noop)
    await rec({"type": "http.response.start", "status": 200, "headers": []})
    await rec({"type": "http.response.trailers", "headers": [(b"grpc-status", b"5")]})
    assert rec.outcome() == ("NOT_FOUND", True)


async def test_grpc_web_status_from_body_trailer():
    rec = StatusRecorder(_noop, grpc_web=True)
    await rec({"type": "http.response.start", "status": 200, "headers": []})
    trailer = b"grpc-status: 0\r\ngrpc-message: \r\n"
    body = b"\x80" + len(trailer).to_bytes(4, "big") + trailer
    await rec({"type": "http.response.body", "body": body, "more_body": False})
    assert rec.outcome() == ("OK", False)


async def test_http_status_and_aborted():
    rec = StatusRecorder(_noop)
    assert rec.outcome() == ("aborted", True)
    await rec({"type": "http.response.start", "status": 413, "headers": []})
    assert rec.outcome() == ("413", True)


async def test_a_send_to_a_gone_client_is_client_gone_and_keeps_no_frames():
    # pyvoy fails every send to a gone client with one shared exception object; each raise
    # used to add the raising frames to its traceback, which so kept every cut request.
    shared = OSError("client disconnected")

    async def gone(message):
        raise shared

    for _ in range(3):
        rec = StatusRecorder(gone)
        with pytest.raises(ClientGone) as caught:
            await rec({"type": "http.response.body", "body": b"x", "more_body": True})
        assert caught.value is not shared
        assert shared.__traceback__ is None
        assert shared.__context__ is None and shared.__cause__ is None
