"""A thin async adapter over etcd (through aetcd): the only module that imports it.

Membership, partition ownership and the coordinator speak to etcd through
:class:`EtcdClient`: keys are text, values bytes, every read says the ``mod_revision`` it
saw, conditional writes (create, compare-and-swap, delete-if) are single transactions that
return whether they applied, leases are granted, refreshed and revoked, and a prefix is
watched from a revision as an async iterator of :class:`WatchEvent`. aetcd's and gRPC's
errors are translated here: etcd not answering is :class:`~agentd.errors.Unavailable`, a
lease etcd no longer knows is :class:`LeaseLost`, a watch from a compacted revision is
:class:`WatchCompacted`, a malformed URL is :class:`~agentd.errors.InvalidArgument`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aetcd  # type: ignore[import-untyped]  # no types shipped; converted here

from agentd.errors import AgentdError, InvalidArgument, Unavailable

__all__ = [
    "EtcdClient",
    "EventKind",
    "KeyValue",
    "Lease",
    "LeaseLost",
    "WatchCompacted",
    "WatchEvent",
    "parse_etcd_url",
]

_T = TypeVar("_T")

DEFAULT_TIMEOUT_S = 5.0
# gRPC's reconnect backoff grows to minutes by default: after etcd was down past a
# node's lease the node stayed fenced ~2 s after etcd answered again. Short and capped
# (not grpc.min_reconnect_backoff_ms: gRPC takes it as the connect timeout too).
_CHANNEL = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 500,
}


class LeaseLost(Unavailable):
    """etcd no longer knows the lease (it expired or was revoked): its keys are gone."""


class WatchCompacted(Unavailable):
    """A watch asked for history etcd has compacted away: list again, then watch from the
    listing's revision."""

    def __init__(self, message: str, compacted_revision: int) -> None:
        super().__init__(message)
        self.compacted_revision = compacted_revision


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes  # empty for a delete
    mod_revision: int  # the revision of the change (a delete's own revision)


@dataclass(frozen=True, slots=True)
class Lease:
    id: int
    ttl: int  # seconds, as granted


def parse_etcd_url(url: str) -> list[tuple[str, int]]:
    """The endpoints of ``url``: one or more comma-separated ``http://host:port`` (the
    scheme may be left out). InvalidArgument names the bad part."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidArgument("the etcd URL is empty: expected http://host:port")
    endpoints: list[tuple[str, int]] = []
    for part in url.split(","):
        text = part.strip()
        shown = text[:200]
        if not text:
            raise InvalidArgument(f"the etcd URL {url[:200]!r} has an empty endpoint")
        if "://" not in text:
            text = "http://" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as error:
            raise InvalidArgument(f"etcd endpoint {shown!r}: {error}") from None
        if parts.scheme != "http":
            raise InvalidArgument(
                f"etcd endpoint {shown!r}: only http:// is supported (TLS is not), "
                f"not {parts.scheme}://"
            )
        if not parts.hostname or port is None or port == 0:
            raise InvalidArgument(f"etcd endpoint {shown!r}: expected http://host:port")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise InvalidArgument(f"etcd endpoint {shown!r}: expected only http://host:port")
        endpoints.append((parts.hostname, port))
    return endpoints


def _key(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def _text(key: bytes) -> str:
    # Keys written by someone else may be any bytes: never fail on them.
    return key.decode(errors="replace")


def _lease_id(lease: Lease | int | None) -> int | None:
    if lease is None:
        return None
    return lease.id if isinstance(lease, Lease) else lease


class EtcdClient:
    """One connection to an etcd cluster (the first of its endpoints that answers; the
    next one after a connection failure). ``timeout`` bounds every request.

    Owns its aetcd client; :meth:`aclose` closes it and ends every watch iterator.
    Raises Unavailable when etcd does not answer within ``timeout``.
    """

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoints = parse_etcd_url(url)
        if not timeout > 0:
            raise InvalidArgument(f"the etcd timeout must be positive, not {timeout!r}")
        self._timeout = timeout
        self._index = 0
        self._client: aetcd.Client | None = None
        self._closed = False

    @property
    def endpoint(self) -> str:
        host, port = self.endpoints[self._index]
        return f"http://{host}:{port}"

    def _new_client(self) -> aetcd.Client:
        host, port = self.endpoints[self._index]
        # aetcd hands its timeout to every gRPC call as the deadline.
        return aetcd.Client(host=host, port=port, timeout=self._timeout, options=_CHANNEL)

    async def connect(self, timeout: float | None = None) -> None:
        """Connect to the first endpoint that answers, trying again for up to ``timeout``
        seconds (default: the request timeout; an etcd just started may still be electing
        its leader); Unavailable if none does."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or 0.0)
        while True:
            try:
                await self.revision()
                return
            except Unavailable:
                if loop.time() >= deadline:
                    raise
            await asyncio.sleep(0.1)

    async def aclose(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> EtcdClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(self, what: str, op: Callable[[aetcd.Client], Awaitable[_T]]) -> _T:
        """Run ``op`` on the current endpoint; on a connection failure try the others
        once each. aetcd's errors become agentd's."""
        if self._closed:
            raise Unavailable("the etcd client is closed")
        last: BaseException | None = None
        for _ in range(len(self.endpoints)):
            if self._client is None:
                self._client = self._new_client()
            client = self._client
            try:
                async with asyncio.timeout(self._timeout * 2):  # aetcd's own is per call
                    return await op(client)
            except (
                aetcd.ConnectionFailedError,
                aetcd.ConnectionTimeoutError,
                TimeoutError,
            ) as error:
                last = error
                if len(self.endpoints) > 1:
                    self._client = None
                    self._index = (self._index + 1) % len(self.endpoints)
                    await client.close()
            except aetcd.ClientError as error:
                raise _translate(what, self.endpoint, error) from error
        raise Unavailable(
            f"etcd at {self.endpoint} did not answer ({what}): {_reason(last)}"
        ) from last

    # -- keys ---------------------------------------------------------------------------

    async def get(self, key: str | bytes) -> tuple[bytes, int] | None:
        """``(value, mod_revision)`` of ``key``, or None when it is absent."""
        got = await self._call("get", lambda c: c.get(_key(key)))
        return None if got is None else (got.value, got.mod_revision)

    async def get_prefix(self, prefix: str | bytes) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted by key) and the store's revision at the
        read (watch from ``revision + 1`` to miss nothing after it)."""
        got = await self._call(
            "get_prefix", lambda c: c.get_prefix(_key(prefix), sort_order="ascend")
        )
        items = [KeyValue(_text(kv.key), kv.value, kv.mod_revision, kv.lease) for kv in got]
        return items, got.header.revision

    async def revision(self) -> int:
        """The store's current revision."""
        # A range over one unlikely key answers with the header's revision.
        got = await self._call(
            "revision", lambda c: c.get_range(b"\0agentd-revision", b"\0agentd-revision\0")
        )
        return int(got.header.revision)

    async def put(self, key: str | bytes, value: bytes, lease: Lease | int | None = None) -> int:
        """Write ``key`` unconditionally; the revision of the write."""
        put = await self._call("put", lambda c: c.put(_key(key), value, lease=_lease_id(lease)))
        return int(put.header.revision)

    async def create(
        self, key: str | bytes, value: bytes, lease: Lease | int | None = None
    ) -> bool:
        """Write ``key`` only if it is absent; whether it was written."""
        return await self._txn("create", _key(key), 0, value, lease, version=True)

    async def compare_and_swap(
        self, key: str | bytes, value: bytes, mod_revision: int, lease: Lease | int | None = None
    ) -> bool:
        """Write ``key`` only if its ``mod_revision`` is still the one read (0: the key is
        absent); whether it was written."""
        return await self._txn("compare_and_swap", _key(key), mod_revision, value, lease)

    async def delete(self, key: str | bytes) -> bool:
        """Delete ``key``; whether it existed."""
        deleted = await self._call("delete", lambda c: c.delete(_key(key)))
        return deleted is not None

    async def delete_if(self, key: str | bytes, mod_revision: int) -> bool:
        """Delete ``key`` only if its ``mod_revision`` is still the one read."""
        return await self._txn("delete_if", _key(key), mod_revision, None, None)

    async def _txn(
        self,
        what: str,
        key: bytes,
        revision: int,
        value: bytes | None,
        lease: Lease | int | None,
        *,
        version: bool = False,
    ) -> bool:
        if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
            raise InvalidArgument(f"a revision is a non-negative integer, not {revision!r}")

        async def op(client: aetcd.Client) -> bool:
            ops = client.transactions
            # An absent key has version 0 and mod_revision 0: both compare as "absent".
            compare = ops.version(key) == 0 if version else ops.mod(key) == revision
            action = (
                ops.delete(key) if value is None else ops.put(key, value, lease=_lease_id(lease))
            )
            succeeded, _ = await client.transaction(compare=[compare], success=[action], failure=[])
            return bool(succeeded)

        return await self._call(what, op)

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (watches from older revisions then raise
        WatchCompacted)."""
        await self._call("compact", lambda c: c.compact(revision))

    # -- leases -------------------------------------------------------------------------

    async def grant_lease(self, ttl: float) -> Lease:
        """A new lease of ``ttl`` seconds (rounded up to whole seconds, etcd's unit)."""
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
            raise InvalidArgument(f"a lease TTL is a positive number of seconds, not {ttl!r}")
        seconds = max(1, math.ceil(ttl))
        lease = await self._call("grant_lease", lambda c: c.lease(seconds))
        return Lease(int(lease.id), int(lease.ttl))

    async def refresh_lease(self, lease: Lease | int) -> int:
        """Keep ``lease`` alive one more TTL; its remaining TTL. LeaseLost when etcd no
        longer knows it (expired or revoked)."""
        lease_id = _lease_id(lease)
        reply = await self._call("refresh_lease", lambda c: c.refresh_lease(lease_id))
        if reply is None or reply.TTL <= 0:
            raise LeaseLost(f"etcd lease {lease_id:x} has expired")
        return int(reply.TTL)

    async def revoke_lease(self, lease: Lease | int) -> None:
        """Revoke ``lease`` (its keys go with it); a lease already gone is not an error."""
        lease_id = _lease_id(lease)
        with contextlib.suppress(LeaseLost):
            await self._call("revoke_lease", lambda c: c.revoke_lease(lease_id))

    async def lease_time_to_live(self, lease: Lease | int) -> int | None:
        """Seconds ``lease`` has left, or None when etcd no longer knows it (for
        ``agentd cluster status``)."""
        lease_id = _lease_id(lease)
        try:
            reply = await self._call(
                "lease_time_to_live", lambda c: c.get_lease_info(lease_id, keys=False)
            )
        except LeaseLost:
            return None
        return None if reply.TTL < 0 else int(reply.TTL)

    # -- watches ------------------------------------------------------------------------

    async def watch_prefix(
        self, prefix: str | bytes, start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Every change under ``prefix`` from ``start_revision`` (inclusive; None: from
        now), in revision order. The iterator ends when the client closes, raises
        Unavailable when etcd goes away (watch again from the next revision) and
        WatchCompacted when ``start_revision`` is no longer in etcd's history. Leaving the
        ``async for`` (or closing the iterator) cancels the watch."""
        watch = await self._call(
            "watch_prefix",
            lambda c: c.watch_prefix(_key(prefix), start_revision=start_revision),
        )
        return self._events(watch)

    async def _events(self, watch: Any) -> AsyncIterator[WatchEvent]:
        try:
            async for event in watch:
                kv = event.kv
                kind = EventKind.PUT if event.kind == aetcd.EventKind.PUT else EventKind.DELETE
                yield WatchEvent(kind, _text(kv.key), kv.value, kv.mod_revision)
        except aetcd.RevisionCompactedError as error:
            raise WatchCompacted(
                f"etcd has compacted its history below revision {error.compacted_revision}",
                error.compacted_revision,
            ) from error
        except aetcd.ClientError as error:
            raise _translate("watch", self.endpoint, error) from error
        except Exception as error:  # the watch stream's own gRPC error
            if self._closed:
                return
            raise Unavailable(
                f"the etcd watch on {self.endpoint} ended: {_reason(error)}"
            ) from error
        finally:
            with contextlib.suppress(Exception):  # the stream may be gone already
                await watch.cancel()


def _reason(error: BaseException | None) -> str:
    if error is None:
        return "no endpoint"
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


def _translate(what: str, endpoint: str, error: BaseException) -> AgentdError:
    if isinstance(error, aetcd.InvalidArgumentError):
        return InvalidArgument(f"etcd refused {what}: {_reason(error)}")
    if "lease not found" in str(error):
        return LeaseLost(f"etcd refused {what}: {_reason(error)}")
    return Unavailable(f"etcd at {endpoint} failed {what}: {_reason(error)}")
