"""Agent state in Redis, shared by the nodes of a cluster: versioned (fenced) writes,
grouped into one Lua script per batch.

Layout: one hash per agent, ``<key_prefix><type>/<id>`` with fields ``v`` (the version: the
number of committed writes, absent = 0) and ``s`` (the snapshot).

Fencing: ``load`` remembers the version it read (per address); a save carries the version
the store last saw for its agent, and the script writes only if Redis still holds that
version, then stores the snapshot with the version + 1. A node that lost an agent to
another (two nodes briefly both believing they own it during a hand-over) finds a newer
version there: its write is refused, and only that agent's save fails (Unavailable, its
state dropped through ``on_commit_failed``, read again before its next turn); the other
writes of the batch commit. Versions are kept for every agent this store has read or
written (an int per address; the host does not tell the store about passivation).

Group commit as in SQLite: saves arriving while a batch is in flight go together in the
next one; a batch is one round trip (scripts of at most ``_KEYS_PER_SCRIPT`` agents,
pipelined). Loads are grouped the same way, and a load waits for the pending write of its
own agent first (an agent passivated and activated again reads its last turn).

Redis unreachable: commits and loads fail with Unavailable within the socket timeouts,
``failing()`` says why, and the client reconnects by itself once Redis is back (a pooled
connection broken by a restart is retried once on a new one; a write retried after its
reply was lost finds its own snapshot at the next version and counts as committed).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from agentd.errors import ConfigError, Unavailable
from agentd.runtime.state.health import StoreHealth

if TYPE_CHECKING:
    from agentd.runtime.state import CommitFailed

__all__ = ["FenceObserver", "RedisStateStore"]

log = logging.getLogger(__name__)

# A batch travels as one argument (building a command of thousands of arguments costs
# redis-py ~5 µs per write on the event loop; one packed blob, ~0.5 µs). The keys are not
# declared to Redis: a single server (or a primary with replicas), not Redis Cluster.
_ROW = struct.Struct(">QII")  # expected version, key length, snapshot length; then both
_KEY = struct.Struct(">I")  # key length; then the key
_FOUND = struct.Struct(">QI")  # version (0: none), snapshot length; then the snapshot

# ARGV[1]: rows as _ROW packs them. Returns the 1-based indexes of the refused (stale)
# writes. A key already holding this very snapshot at the next version is our own write,
# sent again after its reply was lost.
_WRITE = """
local data = ARGV[1]
local pos, n, i = 1, #data, 0
local stale = {}
while pos <= n do
  i = i + 1
  local expected, klen, slen
  expected, klen, slen, pos = struct.unpack('>I8I4I4', data, pos)
  local key = string.sub(data, pos, pos + klen - 1)
  local snapshot = string.sub(data, pos + klen, pos + klen + slen - 1)
  pos = pos + klen + slen
  local v = tonumber(redis.call('HGET', key, 'v') or '0')
  if v == expected then
    redis.call('HSET', key, 'v', v + 1, 's', snapshot)
  elseif not (v == expected + 1 and redis.call('HGET', key, 's') == snapshot) then
    stale[#stale + 1] = i
  end
end
return stale
"""

# ARGV[1]: keys as _KEY packs them. Returns one string: _FOUND and the snapshot per key.
_READ = """
local data = ARGV[1]
local pos, n = 1, #data
local out = {}
while pos <= n do
  local klen
  klen, pos = struct.unpack('>I4', data, pos)
  local got = redis.call('HMGET', string.sub(data, pos, pos + klen - 1), 'v', 's')
  pos = pos + klen
  local snapshot = got[2] or ''
  out[#out + 1] = struct.pack('>I8I4', tonumber(got[1] or '0'), #snapshot)
  out[#out + 1] = snapshot
end
return table.concat(out)
"""


class FenceObserver(Protocol):
    """Told how many writes of a stale owner the store refused (the cluster metrics)."""

    def fenced_write(self, count: int = 1) -> None: ...


def check_redis_url(url: object) -> str:
    """``url`` if it names a Redis server agentd can use, else ConfigError saying why."""
    if not isinstance(url, str) or not url:
        raise ConfigError("redis_url must be a URL such as redis://127.0.0.1:6379/0")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"redis_url {url[:200]!r}: the scheme must be redis://, rediss:// or unix://"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in range
    except ValueError:
        raise ConfigError(f"redis_url {url[:200]!r}: the port is not a number 0-65535") from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(f"redis_url {url[:200]!r}: no host (redis://HOST:PORT/DB)")
    if parts.scheme == "unix" and not parts.path:
        raise ConfigError(f"redis_url {url[:200]!r}: no socket path (unix:///path/redis.sock)")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ConfigError(f"redis_url {url[:200]!r}: the database must be a number (/0)")
    return url


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStateStore:
    """Snapshots in Redis hashes with versioned writes (module doc). Owns its connection
    pool (closed by ``aclose``)."""

    _KEYS_PER_SCRIPT = 2048  # agents per script: Redis runs one script at a time
    _LOG_EVERY_S = 10.0  # while operations keep failing, one log line per this many seconds

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "agentd:state:",
        observer: FenceObserver | None = None,
        failure_window_s: float = 10.0,
        socket_timeout_s: float = 5.0,
    ) -> None:
        self.url = check_redis_url(url)
        if not isinstance(key_prefix, str):
            raise ConfigError("key_prefix must be a string")
        self.key_prefix = key_prefix
        # Told about fenced writes (the node's ClusterMetrics); may be set after creation.
        self.observer = observer
        self._socket_timeout_s = socket_timeout_s
        self._client: aredis.Redis | None = None
        self._shas = {"write": "", "read": ""}  # the scripts' SHA1s on the server
        # address -> the version Redis holds for it as far as this store knows (absent: 0).
        self._versions: dict[str, int] = {}
        self._queued: dict[str, bytes] = {}  # the next batch: an address's last write wins
        self._waiters: list[Any] = []  # flat: address, future, ... for the queued saves
        self._inflight: dict[str, bytes] = {}  # the batch being written
        self._writing: asyncio.Task[list[str]] | None = None
        self._write_scheduled = False
        self._load_queue: list[Any] = []  # flat: address, future, ...
        self._reading: asyncio.Task[None] | None = None
        self._read_scheduled = False
        self.writes = 0
        self.commits = 0
        self.last_commit_size = 0  # saves in the last batch written (or failed)
        self.errors = 0
        self.fenced = 0  # writes refused as stale (not failures of the store)
        self.round_trips = 0  # pipelines sent for writes
        self.scripts = 0  # write scripts run
        self.empty_at_open = False
        self.on_commit_failed: CommitFailed | None = None
        # Failing while operations fail, until one succeeds or ``failure_window_s`` passes
        # without a failure.
        self._health = StoreHealth(
            log,
            noun="operation",
            recovered="state store: Redis answers again (after %d failed operations)",
            window_s=failure_window_s,
            log_every_s=self._LOG_EVERY_S,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, load the scripts and see whether any state is stored under the prefix.
        Raises Unavailable when Redis cannot be reached."""
        client = aredis.Redis.from_url(
            self.url,
            socket_timeout=self._socket_timeout_s,
            socket_connect_timeout=self._socket_timeout_s,
            # One retry on a new connection: a pooled connection broken by a Redis restart
            # must not fail the first batch after it is back. Not more: a caller waits.
            retry=Retry(NoBackoff(), 1),
        )
        try:
            for name, source in _SCRIPTS.items():
                self._shas[name] = await client.script_load(source)
            self.empty_at_open = not await self._any_key(client)
        except RedisError as exc:
            await client.aclose()
            raise Unavailable(
                f"state store: Redis at {self._where()} is not reachable: {exc}"
            ) from exc
        self._client = client

    async def _any_key(self, client: aredis.Redis) -> bool:
        match = _glob_escape(self.key_prefix) + "*"
        cursor = 0
        while True:
            cursor, keys = await client.scan(cursor, match=match, count=1000)
            if keys:
                return True
            if not cursor:
                return False

    def _where(self) -> str:
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path

    async def flush(self) -> None:
        while self._queued or self._writing is not None or self._write_scheduled:
            if self._writing is not None:
                await asyncio.wait([self._writing])
            else:
                await asyncio.sleep(0)

    async def aclose(self) -> None:
        await self.flush()
        while self._load_queue or self._reading is not None or self._read_scheduled:
            if self._reading is not None:
                await asyncio.wait([self._reading])
            else:
                await asyncio.sleep(0)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def version(self, address: str) -> int:
        """The version of ``address``'s state as this store last read or wrote it (0:
        none seen); its next write expects Redis to hold this one."""
        return self._versions.get(address, 0)

    def forget(self, address: str) -> None:
        """The host passivated ``address``: drop its remembered version (its next
        activation loads it again), unless a write of it is queued or in flight, which
        still needs it."""
        if address not in self._queued and address not in self._inflight:
            self._versions.pop(address, None)

    # -- writes ---------------------------------------------------------------------------

    def save(self, address: str, snapshot: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued[address] = snapshot
        waiters = self._waiters
        waiters.append(address)
        waiters.append(future)
        if not self._write_scheduled and self._writing is None:
            self._schedule_write()
        return future

    def save_nowait(self, address: str, snapshot: bytes) -> None:
        self._queued[address] = snapshot
        if not self._write_scheduled and self._writing is None:
            self._schedule_write()

    def _schedule_write(self) -> None:
        self._write_scheduled = True
        asyncio.get_running_loop().call_soon(self._start_write)

    def _start_write(self) -> None:
        self._write_scheduled = False
        if not self._queued:
            return
        rows, self._queued = self._queued, {}
        waiters, self._waiters = self._waiters, []
        self._inflight = rows
        task = asyncio.get_running_loop().create_task(self._write(rows))
        self._writing = task
        task.add_done_callback(lambda t: self._written(rows, waiters, t))

    async def _write(self, rows: dict[str, bytes]) -> list[str]:
        """Commit ``rows`` (one round trip); returns the addresses refused as stale."""
        versions = self._versions
        addresses = list(rows)
        prefix = self.key_prefix
        pack = _ROW.pack
        step = self._KEYS_PER_SCRIPT
        starts = range(0, len(addresses), step)
        blobs = []
        for start in starts:
            parts: list[bytes] = []
            append = parts.append
            for address in addresses[start : start + step]:
                key = (prefix + address).encode()
                snapshot = rows[address]
                append(pack(versions.get(address, 0), len(key), len(snapshot)))
                append(key)
                append(snapshot)
            blobs.append(b"".join(parts))
        results = await self._eval("write", blobs)
        self.round_trips += 1
        self.scripts += len(blobs)
        stale = [
            addresses[start + int(i) - 1]
            for start, refused in zip(starts, results, strict=True)
            for i in refused
        ]
        for address in addresses:
            versions[address] = versions.get(address, 0) + 1
        for address in stale:
            del versions[address]  # read again with the agent's state (the host drops it)
        self.writes += len(addresses) - len(stale)
        self.commits += 1
        return stale

    def _written(
        self, rows: dict[str, bytes], waiters: list[Any], task: asyncio.Task[list[str]]
    ) -> None:
        self._writing = None
        self._inflight = {}
        # The batch's size, read by its waiters' callbacks (state.commit spans), which run
        # before the next batch can finish (it needs a round trip).
        self.last_commit_size = len(rows)
        exc: BaseException | None = asyncio.CancelledError() if task.cancelled() else None
        exc = exc or task.exception()
        if exc is not None:
            self._commit_failed(rows, waiters, self._unavailable(exc))
        else:
            if self._health.failures:
                self._health.succeeded()
            stale = task.result()
            if stale:
                self._refused(set(stale), waiters)
            else:
                for i in range(1, len(waiters), 2):
                    future = waiters[i]
                    if not future.done():
                        future.set_result(None)
        if self._queued and not self._write_scheduled:
            self._start_write()  # what arrived meanwhile: the next batch

    def _refused(self, stale: set[str], waiters: list[Any]) -> None:
        """Writes refused as stale (another node wrote these agents since this one read
        them): fail only their saves, and have the host drop their states."""
        self.fenced += len(stale)
        if self.observer is not None:
            self.observer.fenced_write(len(stale))
        log.warning(
            "state store: %d write%s refused: another node wrote %s first (this node's"
            " copy is stale and is read again)",
            len(stale),
            "s" if len(stale) > 1 else "",
            ", ".join(sorted(stale)[:5]) + (", ..." if len(stale) > 5 else ""),
        )
        dropped = self._drop_queued(stale)
        for pairs in (waiters, dropped):
            for i in range(0, len(pairs), 2):
                future = pairs[i + 1]
                if future.done():
                    continue
                if pairs[i] in stale:
                    future.set_exception(_fenced(pairs[i]))
                else:
                    future.set_result(None)
        self._report(
            stale, Unavailable(f"{len(stale)} agents' states were written by another node; retry")
        )

    def _commit_failed(
        self, rows: dict[str, bytes], waiters: list[Any], error: Unavailable
    ) -> None:
        self.errors += 1
        self._health.failed("commit", error.message)
        failed = set(rows)
        versions = self._versions
        for key in failed:
            # Unknown whether it committed (a reply lost): the host drops these states and
            # reads them, with their versions, again.
            versions.pop(key, None)
        for pairs in (waiters, self._drop_queued(failed)):
            for i in range(1, len(pairs), 2):
                future = pairs[i]
                if not future.done():
                    future.set_exception(error)
        self._report(failed, error)

    def _drop_queued(self, failed: set[str]) -> list[Any]:
        """Drop the queued saves of ``failed`` agents (made on top of the state that
        failed); returns their waiters (flat: address, future, ...)."""
        queued = self._queued
        for key in failed:
            queued.pop(key, None)
        dropped: list[Any] = []
        waiters = self._waiters
        if waiters:
            keep: list[Any] = []
            for i in range(0, len(waiters), 2):
                (dropped if waiters[i] in failed else keep).extend((waiters[i], waiters[i + 1]))
            self._waiters = keep
        return dropped

    def _report(self, keys: Collection[str], error: BaseException) -> None:
        if self.on_commit_failed is not None:
            try:
                self.on_commit_failed(keys, error)
            except Exception:
                log.exception("state store: the commit-failure handler raised")

    # -- reads ----------------------------------------------------------------------------

    async def load(self, address: str) -> bytes | None:
        """The snapshot of ``address`` (None: none stored); remembers its version. Raises
        Unavailable when Redis cannot be read."""
        while address in self._queued or address in self._inflight:
            # Its own last write first (passivated and activated again meanwhile).
            if self._writing is not None:
                await asyncio.wait([self._writing])
            else:
                await asyncio.sleep(0)
        future: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        queue = self._load_queue
        queue.append(address)
        queue.append(future)
        if not self._read_scheduled and self._reading is None:
            self._read_scheduled = True
            asyncio.get_running_loop().call_soon(self._start_read)
        return await future

    def _start_read(self) -> None:
        self._read_scheduled = False
        if not self._load_queue:
            return
        items, self._load_queue = self._load_queue, []
        task = asyncio.get_running_loop().create_task(self._read(items))
        self._reading = task
        task.add_done_callback(lambda t: self._read_done(items, t))

    async def _read(self, items: list[Any]) -> None:
        addresses = list(dict.fromkeys(items[0::2]))
        prefix = self.key_prefix
        pack = _KEY.pack
        step = self._KEYS_PER_SCRIPT
        starts = range(0, len(addresses), step)
        blobs = []
        for start in starts:
            parts: list[bytes] = []
            for address in addresses[start : start + step]:
                key = (prefix + address).encode()
                parts.append(pack(len(key)))
                parts.append(key)
            blobs.append(b"".join(parts))
        results = await self._eval("read", blobs)
        versions = self._versions
        found: dict[str, bytes] = {}
        unpack = _FOUND.unpack_from
        head = _FOUND.size
        for start, blob in zip(starts, results, strict=True):
            pos = 0
            for address in addresses[start : start + step]:
                version, size = unpack(blob, pos)
                pos += head
                if version:
                    versions[address] = version
                    found[address] = blob[pos : pos + size]
                else:
                    versions.pop(address, None)
                pos += size
        if self._health.failures:
            self._health.succeeded()
        for i in range(0, len(items), 2):
            future = items[i + 1]
            if not future.done():
                future.set_result(found.get(items[i]))

    def _read_done(self, items: list[Any], task: asyncio.Task[None]) -> None:
        self._reading = None
        exc: BaseException | None = asyncio.CancelledError() if task.cancelled() else None
        exc = exc or task.exception()
        if exc is not None:
            error = self._unavailable(exc)
            self._health.failed("load", error.message)
            for i in range(1, len(items), 2):
                future = items[i]
                if not future.done():
                    future.set_exception(error)
        if self._load_queue and not self._read_scheduled:
            self._start_read()

    # -- Redis ----------------------------------------------------------------------------

    async def _eval(self, name: str, calls: list[bytes]) -> list[Any]:
        """Run script ``name`` once per call (its packed argument) in one pipeline."""
        client = self._client
        if client is None:
            raise Unavailable("the Redis state store is not open")
        results = await _pipeline(client, self._shas[name], calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            # Redis restarted and lost its scripts: the NOSCRIPT calls did not run.
            self._shas[name] = sha = await client.script_load(_SCRIPTS[name])
            again = await _pipeline(client, sha, [calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def _unavailable(self, exc: BaseException) -> Unavailable:
        if isinstance(exc, Unavailable):
            return exc
        error = Unavailable(f"state store (Redis at {self._where()}): {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error

    # -- health ---------------------------------------------------------------------------

    def failing(self) -> str | None:
        return self._health.failing()


_SCRIPTS = {"write": _WRITE, "read": _READ}


def _fenced(address: str) -> Unavailable:
    return Unavailable(f"agent {address}'s state was written by another node; retry")


async def _pipeline(client: aredis.Redis, sha: str, calls: list[bytes]) -> list[Any]:
    """EVALSHA once per call, in one round trip; a script's error comes back as its
    result (NOSCRIPT is handled by the caller)."""
    async with client.pipeline(transaction=False) as pipe:
        for blob in calls:
            pipe.execute_command("EVALSHA", sha, 0, blob)
        return await pipe.execute(raise_on_error=False)
