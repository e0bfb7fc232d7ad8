"""The ASGI entry point Envoy (pyvoy) loads: ``agentd.gateway.entry:app``.

Envoy runs the app in its own embedded interpreter, so settings travel from the ``agentd
serve`` process through one environment variable. The real app is built at lifespan
startup, not at import.

pyvoy runs one event loop per listener filter chain: with HTTP/3 on, the QUIC listener gets
a second loop on a second thread, with its own lifespan. The gateway (agents, batchers,
locks) belongs to one loop, so the first loop to start owns it and requests arriving on any
other loop are forwarded to it, their ``receive``/``send`` calls bridged back.

Draining: ``agentd serve`` hands Envoy the read end of a pipe (its descriptor number in
``AGENTD_DRAIN_FD``) and closes the write end when it begins to drain (or when it dies).
The home loop watches that end, and the gateway then says it is not ready everywhere
while its in-flight calls finish. ASGI has no message for "draining": the lifespan
shutdown comes only after the drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from agentd.gateway.detach import ClientGone, client_gone, detach
from agentd.gateway.head import as_get

__all__ = ["DRAIN_FD_ENV", "SETTINGS_ENV", "app"]

log = logging.getLogger(__name__)

SETTINGS_ENV = "AGENTD_SERVE_SETTINGS"
DRAIN_FD_ENV = "AGENTD_DRAIN_FD"


class _OneLoopApp:
    def __init__(self) -> None:
        self._gateway: Any = None
        self._home: asyncio.AbstractEventLoop | None = None
        self._claim = threading.Lock()

    def _is_home(self, loop: asyncio.AbstractEventLoop) -> bool:
        with self._claim:
            if self._home is None:
                self._home = loop
                self._gateway = _build()
                _watch_drain(loop, self._gateway)
            return self._home is loop

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        loop = asyncio.get_running_loop()
        receive = detach(receive)  # see agentd.gateway.detach
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope, send = as_get(scope, send)  # every route at once; see agentd.gateway.head
        try:
            if self._is_home(loop):
                await self._gateway(scope, receive, send)
            elif scope["type"] == "lifespan":
                await _idle_lifespan(receive, send)
            else:
                assert self._home is not None
                await _forward(self._gateway, scope, receive, send, self._home, loop)
        except ClientGone:
            # A client leaving mid-response is normal: nothing to report, nothing kept.
            log.debug("client left before %s %s was answered", scope.get("method"), scope["path"])


def _watch_drain(loop: asyncio.AbstractEventLoop, gateway: Any) -> None:
    """Tell ``gateway`` to drain once the pipe named by ``DRAIN_FD_ENV`` reads its end (the
    server process closed the other end to drain, or died). Nothing without the variable."""
    raw = os.environ.get(DRAIN_FD_ENV)
    if not raw:
        return
    try:
        fd = int(raw)
        os.set_blocking(fd, False)
    except (ValueError, OSError) as exc:
        log.warning(
            "%s=%r is not a readable pipe (%s): draining will not show", DRAIN_FD_ENV, raw, exc
        )
        return

    def on_notice() -> None:
        try:
            if os.read(fd, 64):
                return  # a byte, not the end: keep waiting for the end
        except BlockingIOError:
            return
        except OSError:
            pass
        loop.remove_reader(fd)
        os.close(fd)
        gateway.start_draining()

    loop.add_reader(fd, on_notice)


async def _idle_lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _bridge(
    call: Callable[..., Awaitable[Any]], loop: asyncio.AbstractEventLoop
) -> Callable[..., Awaitable[Any]]:
    async def on_loop(*args: Any) -> Any:
        # pyvoy's receive/send return awaitables that are not coroutines.
        try:
            return await call(*args)
        except OSError as exc:  # its shared ClientDisconnectedError: scrub it on its own loop
            raise client_gone(exc) from None

    async def bridged(*args: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(on_loop(*args), loop))

    return bridged


async def _forward(
    gateway: Any,
    scope: dict[str, Any],
    receive: Any,
    send: Any,
    home: asyncio.AbstractEventLoop,
    here: asyncio.AbstractEventLoop,
) -> None:
    handled = asyncio.run_coroutine_threadsafe(
        gateway(scope, _bridge(receive, here), _bridge(send, here)), home
    )
    try:
        await asyncio.wrap_future(handled)
    except asyncio.CancelledError:
        handled.cancel()  # the client went away: cancel the request on the home loop too
        raise


def _build() -> Any:
    from agentd.gateway.app import Gateway
    from agentd.observability.logs import setup_logging
    from agentd.settings import Settings

    raw = os.environ.get(SETTINGS_ENV)
    settings = Settings.model_validate_json(raw) if raw else Settings()
    setup_logging(settings)  # here: the node runs in Envoy's embedded interpreter
    return Gateway.from_settings(settings)


app = _OneLoopApp()
