"""detach: the app may cancel the futures it awaits without cancelling the server's."""

import asyncio
import gc

import pytest

from agentd.gateway.detach import detach


async def test_results_and_errors_pass_through():
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future] = []

    def receive():
        pending.append(loop.create_future())
        return pending[-1]

    detached = detach(receive)
    got = detached()
    pending[-1].set_result({"type": "http.request"})
    assert await got == {"type": "http.request"}
    failing = detached()
    pending[-1].set_exception(OSError("gone"))
    with pytest.raises(OSError, match="gone"):
        await failing


async def test_giving_up_leaves_the_server_future_to_the_server():
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        futures = [loop.create_future()]
        server_side = futures[0]
        waiter = asyncio.ensure_future(detach(lambda: futures[0])())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert not server_side.cancelled()
        loop.call_soon(server_side.set_exception, OSError("client left"))  # as pyvoy does
        await asyncio.sleep(0.01)
        del server_side, waiter
        futures.clear()
        gc.collect()  # an unread exception would be reported as "never retrieved" here
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_a_done_future_is_handed_over_as_it_is():
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    ready.set_result({"type": "http.disconnect"})
    assert detach(lambda: ready)() is ready


async def test_a_coroutine_given_up_on_is_still_read_to_the_end():
    # A bridged receive is a coroutine; it used to be wrapped in asyncio.shield, whose
    # inner task, failing after the app gave up, was logged as "never retrieved".
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        release = loop.create_future()

        async def receive():
            await release
            raise OSError("client left")

        waiter = asyncio.ensure_future(detach(receive)())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set_result(None)
        await asyncio.sleep(0.01)
        del waiter
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert reported == []
