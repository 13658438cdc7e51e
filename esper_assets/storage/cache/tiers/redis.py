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
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from esper_assets.errors import TierUnavailable, redact_url
from esper_assets.storage.cache.framing import HEADER_SIZE, FrameParts

log = logging.getLogger(__name__)


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
        """The stored frame as header and payload: ``GETRANGE`` of the header and
        ``GETRANGE`` of the rest, pipelined in one round trip.

        The payload arrives as its own ``bytes``, so a hit hands it to the caller without
        copying it out of the frame: one buffer of the value's size per read, as a raw
        GET allocates (see :func:`framing.unpack_parts`). The two commands are not a
        transaction (``MULTI``/``EXEC`` costs ~4 us a read): a write between them tears
        the frame, its checksum then fails, and the reader asks again with
        ``atomic=True`` before it calls the copy corrupt. The commands are sent on a
        pooled connection directly (redis-py's per-command wrapper costs ~5 us); a
        connection that failed mid-reply is closed, never returned to the pool dirty.
        """
        name = self.prefix + key
        commands = [("GETRANGE", name, 0, HEADER_SIZE - 1), ("GETRANGE", name, HEADER_SIZE, -1)]
        if atomic:
            commands = [("MULTI",), *commands, ("EXEC",)]
        pool = self._pool
        try:
            conn = pool.get_connection()
        except redis.RedisError as exc:
            raise self._unavailable(exc) from exc
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            if atomic:
                conn.read_response()  # OK
                conn.read_response()  # QUEUED
                conn.read_response()  # QUEUED
                head, payload = conn.read_response()
                for part in (head, payload):
                    if isinstance(part, Exception):  # an error inside EXEC (WRONGTYPE, ...)
                        raise part
            else:
                head = conn.read_response()
                payload = conn.read_response()
        except redis.RedisError as exc:
            conn.disconnect()
            raise self._unavailable(exc) from exc
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if not head:  # absent, or a fence (b"")
            return None
        return FrameParts(head, payload, atomic)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        try:
            values = self.client.mget([self.prefix + k for k in keys])
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
        self._pool.disconnect()


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
