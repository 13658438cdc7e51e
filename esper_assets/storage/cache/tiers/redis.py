"""L2: Redis. Framed bytes under ``<prefix><id>`` with a native TTL, plus the
pub/sub channel that carries invalidations to every process's L1.

Two kinds of write, so that a reader can never undo an invalidation:
- authoritative (``put_many``, ``fence_many``): a ``put`` or ``invalidate`` of the
  cache; always overwrites.
- promotion (``add_many``): a copy that a reader found in a lower tier; written
  only where the key is absent (``SET NX``). ``invalidate`` leaves a *fence*, an
  empty value that lives ``fence_seconds``, in place of the copy it removes; a
  reader that fetched the old value from L3 before the delete then finds the key
  taken and its late promotion is refused. No valid frame is empty, so reads see a
  fence as a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper_assets.errors import TierUnavailable, redact_url
from esper_assets.storage.cache.framing import HEADER_SIZE, FrameParts

log = logging.getLogger(__name__)


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(arg), arg)


# get_parts' commands in RESP, packed by hand: GETRANGE <key> 28 -1, GETRANGE <key> 0 27
_GETRANGE = b"*4\r\n$8\r\nGETRANGE\r\n$%d\r\n%b\r\n%b"
_HEAD_RANGE = _bulk(b"0") + _bulk(str(HEADER_SIZE - 1).encode())
_REST_RANGE = _bulk(str(HEADER_SIZE).encode()) + _bulk(b"-1")


def _read_one(conn) -> Any:
    return conn.read_response()


def _read_parts(conn) -> tuple[bytes, bytes]:
    """The replies of GETRANGE <payload>, GETRANGE <header>: (header, payload)."""
    payload = conn.read_response()
    return conn.read_response(), payload


def _read_parts_atomic(conn) -> tuple[bytes, bytes]:
    """The same inside MULTI/EXEC."""
    conn.read_response()  # OK
    conn.read_response()  # QUEUED
    conn.read_response()  # QUEUED
    payload, head = conn.read_response()
    for part in (payload, head):
        if isinstance(part, Exception):  # an error inside EXEC (WRONGTYPE, ...)
            raise part
    return head, payload


class RedisTier:
    name = "l2"
    durable = False

    def __init__(
        self,
        url: str,
        prefix: str = "esper:kc:",
        ttl_seconds: float | None = 86400,
        timeout_s: float = 0.25,
        pool_size: int = 16,
        fence_seconds: float = 60.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.fence_ms = max(1, int(fence_seconds * 1000))
        self.channel = f"{prefix}invalidate"
        # Messages are "<sender> <key>" so a process can ignore its own announcements.
        self.sender = uuid.uuid4().hex
        # No retries: one failure is one bounded timeout, then the breaker decides.
        self._pool = redis.ConnectionPool.from_url(
            url,
            max_connections=pool_size,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.client = redis.Redis(connection_pool=self._pool)
        self._discard_if_same = self.client.register_script(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"
            " return 0"
        )
        self.timeout_s = timeout_s
        # Connections get_parts and get_many checked out of the pool and keep (at most
        # as many as threads ever read at once; the pool's max_connections still bounds).
        self._idle: list = []
        self._idle_pid = os.getpid()

    def _unavailable(self, exc: Exception) -> TierUnavailable:
        return TierUnavailable(f"L2 Redis at {redact_url(self.url)} failed: {exc}")

    def _ttl_ms(self) -> int | None:
        return int(self.ttl_seconds * 1000) if self.ttl_seconds else None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get(self.prefix + key) or None  # b"" is a fence: a miss
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def get_parts(self, key: str, atomic: bool = False) -> FrameParts | None:
        """The stored frame as header and payload: ``GETRANGE`` of the payload (the
        frame after its header) and ``GETRANGE`` of the header, pipelined in one round
        trip.

        The payload arrives as its own ``bytes``, so a hit hands it to the caller without
        copying it out of the frame: one buffer of the value's size per read, as a raw
        GET allocates (see :func:`framing.unpack_parts`). The two commands are not a
        transaction (``MULTI``/``EXEC`` costs ~4 us a read): a write between them tears
        the frame, its checksum then fails, and the reader asks again with
        ``atomic=True`` before it calls the copy corrupt.

        This is the hot path of an L2 hit, so it skips redis-py's per-command machinery
        (packing ~4 us, pool checkout and return ~5 us a call): the commands are packed
        here and sent on a connection kept on a small LIFO list of idle ones (see
        :meth:`_checkout`). A connection that failed is closed and returned to the pool,
        never reused with a reply left unread.
        """
        name = (self.prefix + key).encode()
        n = len(name)
        # The payload's command first: its reply then starts hiredis's read buffer, as a
        # GET's does. Behind the 35-byte header reply, the copy of the payload out of
        # that buffer (PyBytes_FromStringAndSize) ran at a fraction of memcpy speed:
        # 248-324 us instead of 160-206 us a 256 KiB read, 792 instead of 367 at 1 MiB.
        packed = _GETRANGE % (n, name, _REST_RANGE) + _GETRANGE % (n, name, _HEAD_RANGE)
        if atomic:
            packed = b"*1\r\n$5\r\nMULTI\r\n" + packed + b"*1\r\n$4\r\nEXEC\r\n"
        try:
            head, payload = self._exchange(packed, _read_parts_atomic if atomic else _read_parts)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        if not head:  # absent, or a fence (b"")
            return None
        return FrameParts(head, payload, atomic)

    def _exchange(self, packed: bytes, read: Callable) -> Any:
        """Send ``packed`` (commands in RESP) on an idle connection and return
        ``read(conn)``, the replies. A reused idle connection the server closed is
        replaced once (as redis-py's pool does on checkout); a timeout is not retried
        (it is the tier's bound)."""
        conn, reused = self._checkout()
        try:
            conn.send_packed_command((packed,))
            result = read(conn)
        except redis.ConnectionError:
            self._discard_connection(conn)
            if not reused:
                raise
            conn = self._pool.get_connection()
            try:
                conn.send_packed_command((packed,))
                result = read(conn)
            except BaseException:
                self._discard_connection(conn)
                raise
        except BaseException:
            self._discard_connection(conn)
            raise
        self._idle.append(conn)
        return result

    def _checkout(self):
        """An idle connection of get_parts (LIFO), else a new one from the pool. The
        list is this process's: after a fork the child starts a list of its own (the
        parent's sockets are never used, nor shut down, from the child)."""
        if self._idle_pid != os.getpid():
            self._idle, self._idle_pid = [], os.getpid()
        try:
            return self._idle.pop(), True
        except IndexError:
            return self._pool.get_connection(), False

    def _discard_connection(self, conn) -> None:
        conn.disconnect()  # _sock is None afterwards: not put back on the idle list
        self._pool.release(conn)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """``MGET``, packed here and sent like get_parts' commands (redis-py's packing
        and pool cost ~45 us of a 100-key MGET)."""
        if not keys:
            return {}
        prefix = self.prefix
        packed = [b"*%d\r\n$4\r\nMGET\r\n" % (len(keys) + 1)]
        for key in keys:
            name = (prefix + key).encode()
            packed.append(b"$%d\r\n%b\r\n" % (len(name), name))
        try:
            values = self._exchange(b"".join(packed), _read_one)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return {k: v for k, v in zip(keys, values, strict=True) if v}  # b"": a fence

    def _pipeline(self, commands: Callable, announce: Iterable[str] = ()) -> None:
        """Run ``commands(pipe)`` and announce ``announce`` in one round trip."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                commands(pipe)
                for key in announce:
                    pipe.publish(self.channel, f"{self.sender} {key}")
                pipe.execute()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def put_many(self, items: Sequence[tuple[str, bytes]], announce: bool = False) -> None:
        """Store framed values; ``announce`` also tells other processes to drop their L1 copy."""
        ttl = self._ttl_ms()

        def commands(pipe) -> None:
            for key, blob in items:
                pipe.set(self.prefix + key, blob, px=ttl)

        self._pipeline(commands, [key for key, _ in items] if announce else ())

    def add_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Promote copies found below: only where the key is absent (see the module doc)."""
        ttl = self._ttl_ms()

        def commands(pipe) -> None:
            for key, blob in items:
                pipe.set(self.prefix + key, blob, px=ttl, nx=True)

        self._pipeline(commands)

    def discard(self, key: str, blob: bytes | FrameParts) -> None:
        """Delete a copy found corrupt or expired, unless it was replaced meanwhile, so
        that the repair (a promotion, which never overwrites) can take its place."""
        if isinstance(blob, FrameParts):
            blob = blob.joined()
        try:
            self._discard_if_same(keys=[self.prefix + key], args=[blob])
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def fence_many(self, keys: Sequence[str], announce: bool = True) -> None:
        """Replace the copies with fences and tell other processes to drop their L1 copy."""

        def commands(pipe) -> None:
            for key in keys:
                pipe.set(self.prefix + key, b"", px=self.fence_ms)

        self._pipeline(commands, keys if announce else ())

    def delete_many(self, keys: Sequence[str], announce: bool = True) -> None:
        """Plain delete (no fence): a later promotion may copy the value back."""
        self._pipeline(
            lambda pipe: pipe.delete(*[self.prefix + k for k in keys]), keys if announce else ()
        )

    def clear(self) -> None:
        """Delete every key under our prefix and tell other processes to drop their L1."""
        try:
            for batch in _batched(self.client.scan_iter(match=self.prefix + "*", count=1000), 1000):
                self.client.delete(*batch)
            self.client.publish(self.channel, f"{self.sender} ")  # empty id: "drop all of L1"
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def cleanup(self) -> list[str]:
        return []  # Redis expires keys itself

    def size(self) -> dict[str, int]:
        entries = stored = 0
        try:
            for batch in _batched(self.client.scan_iter(match=self.prefix + "*", count=1000), 500):
                with self.client.pipeline(transaction=False) as pipe:
                    for key in batch:
                        pipe.strlen(key)
                    lengths = pipe.execute()
                entries += len(lengths)
                stored += sum(lengths)
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        return {"entries": entries, "stored_bytes": stored}

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        self._idle = []
        self._pool.disconnect()  # in-use connections too: the idle list's among them


def _batched(iterable, n):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class InvalidationListener:
    """Background thread that applies other processes' invalidations to our L1.

    Messages published while we are disconnected are lost (pub/sub keeps no
    history), so after every reconnect we call ``on_gap`` and the cache drops its
    whole L1: a cold L1 is slower, a stale one is wrong.
    """

    def __init__(
        self,
        tier: RedisTier,
        on_invalidate: Callable[[str], None],
        on_gap: Callable[[], None],
    ) -> None:
        self._tier = tier
        self._on_invalidate = on_invalidate
        self._on_gap = on_gap
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._client = redis.Redis.from_url(
            tier.url, socket_connect_timeout=tier.timeout_s, retry=Retry(NoBackoff(), 0)
        )
        self._thread = threading.Thread(target=self._run, name="esper-invalidation", daemon=True)
        self._thread.start()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._tier.channel)
                # Every subscription, the first included: if Redis was down when the
                # cache was built, L1 may have filled before we could hear anything.
                self._on_gap()
                self._subscribed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.1)  # also how long close() waits
                    if message and message["type"] == "message":
                        sender, _, key = message["data"].decode("utf-8", "replace").partition(" ")
                        if sender == self._tier.sender:
                            continue
                        if not key:  # no id is empty, so this means "drop all" (see clear())
                            self._on_gap()
                        else:
                            self._on_invalidate(key)
            except (redis.RedisError, OSError) as exc:
                self._subscribed.clear()
                log.debug("invalidation listener lost Redis (%s); retrying", exc)
                self._stop.wait(0.5)
            finally:
                with contextlib.suppress(redis.RedisError, OSError):
                    pubsub.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._client.close()
