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
