"""as_get: a HEAD request answered as its GET, without the body."""

from agentd.gateway.head import as_get


async def _answer(http_version: str, messages: list[dict]) -> tuple[dict, list[dict]]:
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    scope, bodiless = as_get({"type": "http", "method": "HEAD", "http_version": http_version}, send)
    for message in messages:
        await bodiless(message)
    return scope, sent


async def test_the_request_becomes_get_and_the_body_is_dropped():
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", b"6")],
    }
    body = [
        {"type": "http.response.body", "body": b"abc", "more_body": True},
        {"type": "http.response.body", "body": b"def"},
    ]
    scope, sent = await _answer("1.1", [start, *body])
    assert scope["method"] == "GET"
    assert sent == [start, {"type": "http.response.body", "body": b"", "more_body": False}]


async def test_an_unframed_http1_answer_gets_its_gets_length():
    start = {"type": "http.response.start", "status": 405, "headers": [(b"allow", b"POST")]}
    _, sent = await _answer("1.1", [start, {"type": "http.response.body", "body": b"no"}])
    assert sent[0]["headers"] == [(b"allow", b"POST"), (b"content-length", b"2")]
    assert sent[1]["body"] == b""


async def test_http2_headers_go_out_as_they_are():
    start = {"type": "http.response.start", "status": 405, "headers": [(b"allow", b"POST")]}
    _, sent = await _answer("2", [start, {"type": "http.response.body", "body": b"no"}])
    assert sent[0] is start and sent[1]["body"] == b""
