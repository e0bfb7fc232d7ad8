import pytest

from agentd.gateway.admission import BodyTooLarge, TokenCheck, buffer_body, replay


def test_token_check():
    check = TokenCheck(["abc", "def"])
    assert check.enabled
    assert check.allows(b"Bearer abc")
    assert check.allows(b"bearer def")
    assert not check.allows(None)
    assert not check.allows(b"Bearer abcd")
    assert not check.allows(b"abc")
    assert TokenCheck([]).allows(None)


def _receiver(chunks):
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


async def test_buffer_body_joins_chunks_and_enforces_limit():
    body, disconnected = await buffer_body(_receiver([b"ab", b"cd"]), 4)
    assert (body, disconnected) == (b"abcd", False)
    with pytest.raises(BodyTooLarge):
        await buffer_body(_receiver([b"ab", b"cde"]), 4)


async def test_replay_yields_body_once():
    receive = replay(b"xyz", _receiver([]))
    assert (await receive())["body"] == b"xyz"
    assert (await receive())["type"] == "http.disconnect"
