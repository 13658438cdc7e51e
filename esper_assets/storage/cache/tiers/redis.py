"""L2: Redis, one server or a Redis Cluster. Framed bytes under ``<prefix><id>`` with a
native TTL, plus the pub/sub channel that carries invalidations to every process's L1.

Two kinds of write, so that a reader can never undo an invalidation:
- authoritative (``put_many``, ``fence_many``): a ``put`` or ``invalidate`` of the
  cache; always overwrites.
- promotion (``add_many``): a copy that a reader found in a lower tier; written
  only where the key is absent (``SET NX``). ``invalidate`` leaves a *fence*, an
  empty value that lives ``fence_seconds``, in place of the copy it removes; a
  reader that fetched the old value from L3 before the delete then finds the key
  taken and its late promotion is refused. No valid frame is empty, so reads see a
  fence as a miss.

A cluster (``redis+cluster://host:port[,host:port...]``) changes where a key lives,
not what is stored: :class:`OneServer` and :class:`Cluster` say which connection pool
serves a key, how a batch read is split, and where the listener subscribes. Every
command touches one key, so no command ever spans two hash slots. Invalidations are
classic ``PUBLISH`` messages, which a cluster forwards to every node: a listener
subscribed to any live node hears them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, RedisClusterException, TryAgainError
from redis.retry import Retry

from esper_assets.errors import TierUnavailable, redact_url
from esper_assets.storage.cache.framing import HEADER_SIZE, FrameParts

log = logging.getLogger(__name__)

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# Every failure of a call to Redis: redis-py raises RedisClusterException (not a
# RedisError) when no node of a cluster answers.
REDIS_ERRORS = (redis.RedisError, RedisClusterException, OSError)
# Replies that mean "the slot map you used is out of date" (MOVED is an AskError).
_RESHARDED = (AskError, TryAgainError, ClusterDownError)
_DISCARD_IF_SAME = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def connect(url: str, timeout_s: float | None = None, **kwargs: Any) -> redis.Redis | RedisCluster:
    """A redis-py client for ``url`` (a :class:`RedisCluster` for a cluster URL; that one
    reads the slot map now, so it raises if no node answers). For benchmarks and tests
    that want the raw client on the same server the tier uses."""
    timeouts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if is_cluster_url(url):
        return RedisCluster(**cluster_options(url), **timeouts, **kwargs)
    return redis.Redis.from_url(url, **timeouts, **kwargs)


def cluster_options(url: str) -> dict[str, Any]:
    """RedisCluster's arguments for ``redis+cluster://[user:password@]host:port[,...][/0]``
    (``rediss+cluster`` for TLS); Settings has checked the URL's form."""
    scheme, _, rest = url.partition("://")
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    userinfo, _, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    nodes = []
    for host in hosts.split(","):
        parts = urlsplit(f"//{host}")
        nodes.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))
    return {
        "startup_nodes": nodes,
        "username": unquote(user) or None,
        "password": unquote(password) or None,
        "ssl": scheme.lower() == "rediss+cluster",
    }


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


def _pack_mget(names: Sequence[bytes]) -> bytes:
    args = [b"$%d\r\n%b\r\n" % (len(name), name) for name in names]  # no call a name
    return b"*%d\r\n$4\r\nMGET\r\n" % (len(names) + 1) + b"".join(args)


def _pack_gets(names: Sequence[bytes]) -> bytes:
    return b"".join([b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(n), n) for n in names])


def _reader_of(count: int) -> Callable[[Any], list]:
    """Read the replies of ``count`` pipelined commands."""
    return lambda conn: [conn.read_response() for _ in range(count)]


# A batch read's plan: per server, (pool, commands, reader, positions of its keys).
ReadPlan = list[tuple[Any, bytes, Callable[[Any], list], Sequence[int]]]


class OneServer:
    """L2 on one Redis server: one connection pool (batch reads are one ``MGET``)."""

    cluster = False

    def __init__(self, url: str, timeout_s: float, pool_size: int) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.pool = redis.ConnectionPool.from_url(
            url,
            max_connections=pool_size,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # one failure is one bounded timeout: the breaker decides
        )
        self.client = redis.Redis(connection_pool=self.pool)

    def pool_for(self, name: bytes) -> redis.ConnectionPool:
        return self.pool

    def publish_target(self, key: str | None) -> dict[str, Any]:
        return {}

    def subscriber(self, attempt: int) -> redis.client.PubSub:
        # Its own client: the subscription holds a connection for good, outside the pool
        # that bounds the tier's reads and writes; no read timeout, as it waits for news.
        client = redis.Redis.from_url(
            self.url, socket_connect_timeout=self.timeout_s, retry=Retry(NoBackoff(), 0)
        )
        return client.pubsub(ignore_subscribe_messages=True)

    def ping(self) -> None:
        self.client.ping()

    def refresh(self) -> None:
        """Nothing to learn: one server has no slot map."""

    def close(self) -> None:
        self.pool.disconnect()


class Cluster:
    """L2 on a Redis Cluster: a key's pool is its hash slot's primary's; a batch read is
    one pipeline of ``GET`` per node (sent to every node before any reply is read); the
    listener subscribes to the nodes in turn. redis-py's :class:`RedisCluster` keeps the
    slot map; it is built on first use (it asks the cluster for the map at once), so a
    cluster that is down when the cache starts is a tier that fails, not a cache that
    cannot be built."""

    cluster = True

    def __init__(self, url: str, timeout_s: float, pool_size: int) -> None:
        self.url = url
        self._options = cluster_options(url) | {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": timeout_s,
            "max_connections": pool_size,  # per node
            "retry": Retry(NoBackoff(), 0),
            "require_full_coverage": False,  # a node down loses its slots, not the others'
        }
        self._client: RedisCluster | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> RedisCluster:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = RedisCluster(**self._options)
        return self._client

    def pool_for(self, name: bytes) -> redis.ConnectionPool:
        return self.client.get_node_from_key(name).redis_connection.connection_pool

    def plan_reads(self, names: Sequence[bytes]) -> ReadPlan:
        by_pool: dict[Any, list[int]] = {}
        for i, name in enumerate(names):
            by_pool.setdefault(self.pool_for(name), []).append(i)
        return [
            (pool, _pack_gets([names[i] for i in where]), _reader_of(len(where)), where)
            for pool, where in by_pool.items()
        ]

    def publish_target(self, key: str | None) -> dict[str, Any]:
        """Publish through the node that just took ``key``'s write (so a live one; the
        cluster forwards the message to every node)."""
        return {"target_nodes": self.client.get_node_from_key(key)} if key else {}

    def subscriber(self, attempt: int) -> redis.client.PubSub:
        """Subscribe through the next node in turn: a dead node costs one attempt."""
        nodes = self.client.get_nodes()
        node = nodes[attempt % len(nodes)]
        return self.client.pubsub(node=node, ignore_subscribe_messages=True)

    def ping(self) -> None:
        for node in self.client.get_primaries():  # a node down is a tier down
            self.client.ping(target_nodes=node)

    def refresh(self) -> None:
        """Read the slot map again (after MOVED, or a node that stopped answering),
        best effort: when no node answers, the next call fails and tries again."""
        if self._client is None:
            return
        with contextlib.suppress(*REDIS_ERRORS):
            self._client.nodes_manager.initialize()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class _ClosedWhileIdle(Exception):
    """A connection taken from the idle list failed: the server closed it meanwhile."""


class _NodeDown(Exception):
    """A cluster node known to be down holds the key: read it as a miss."""


class DownNodes:
    """The cluster nodes (by connection pool) that stopped answering a read. For
    ``retry_s`` their keys read as misses without a call (L3 has every value), so one
    dead node of three does not take L2 from the others' keys; then one read tries the
    node again. Only a node's first failure is raised (the tier's breaker counts it and
    the error is seen); a retry that fails again just starts another wait. Writes to a
    down node's keys fail at once (the cache then records them as L2 debt)."""

    def __init__(self, retry_s: float) -> None:
        self.retry_s = retry_s
        self._until: dict[Any, float] = {}

    def skip(self, pool) -> bool:
        until = self._until.get(pool)
        return until is not None and time.monotonic() < until

    def failed(self, pool) -> bool:
        """Mark ``pool``'s node down; whether it was down already (then stay quiet)."""
        known = pool in self._until
        self._until[pool] = time.monotonic() + self.retry_s
        return known

    def __bool__(self) -> bool:
        """Whether any node was marked (otherwise there is nothing to look up)."""
        return bool(self._until)

    def answered(self, pools: Iterable) -> None:
        if self._until:
            for pool in pools:
                self._until.pop(pool, None)


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
        node_retry_s: float = 2.0,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.ttl_seconds = ttl_seconds
        self.fence_ms = max(1, int(fence_seconds * 1000))
        self.timeout_s = timeout_s
        self.channel = f"{prefix}invalidate"
        # Messages are "<sender>\n<id>\n<id>...": a process ignores its own announcements.
        self.sender = uuid.uuid4().hex
        self.servers = (Cluster if is_cluster_url(url) else OneServer)(url, timeout_s, pool_size)
        # One server is up or down as a whole: the breaker decides. A cluster's nodes apart.
        self.down = DownNodes(node_retry_s) if self.servers.cluster else None
        # Connections the read path checked out of a pool and keeps, per pool (at most as
        # many as threads ever read at once; the pool's max_connections still bounds).
        self._idle: dict[Any, list] = {}
        self._idle_pid = os.getpid()

    @property
    def client(self) -> redis.Redis | RedisCluster:
        """redis-py's client for everything but the read path."""
        return self.servers.client

    def _unavailable(self, exc: Exception) -> TierUnavailable:
        if isinstance(exc, redis.ConnectionError):
            self.servers.refresh()  # a cluster may have failed over: learn where keys went
        return TierUnavailable(f"L2 Redis at {redact_url(self.url)} failed: {exc}")

    def _ttl_ms(self) -> int | None:
        return int(self.ttl_seconds * 1000) if self.ttl_seconds else None

    # -- reads -----------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get(self.prefix + key) or None  # b"" is a fence: a miss
        except REDIS_ERRORS as exc:
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
        :meth:`_exchange`).
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
        read = _read_parts_atomic if atomic else _read_parts
        try:
            head, payload = self._read(lambda: [(self._live_pool(name), packed, read)])[0]
        except _NodeDown:
            return None
        if not head:  # absent, or a fence (b"")
            return None
        return FrameParts(head, payload, atomic)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Whole frames of ``keys``: one ``MGET`` (one server), or a pipeline of ``GET``
        per node (a cluster), packed here and sent like get_parts' commands (redis-py's
        packing and pool cost ~45 us of a 100-key MGET)."""
        if not keys:
            return {}
        prefix = self.prefix
        names = [(prefix + key).encode() for key in keys]
        if self.servers.cluster:
            values = self._read_spread(names)
        else:
            packed = _pack_mget(names)
            values = self._read(lambda: [(self.servers.pool, packed, _read_one)])[0]
        return {k: v for k, v in zip(keys, values, strict=True) if v}  # b"": a fence

    def _read_spread(self, names: list[bytes]) -> list:
        """The values of ``names`` from the nodes that own them, in ``names``' order."""
        plan: ReadPlan = []

        def requests() -> list:
            down = self.down
            plan[:] = [p for p in self.servers.plan_reads(names) if not down.skip(p[0])]
            return [(pool, packed, read) for pool, packed, read, _ in plan]

        values: list = [None] * len(names)  # a down node's keys stay None: misses
        try:
            answers = self._read(requests)
        except _NodeDown:
            return values
        for (*_, where), replies in zip(plan, answers, strict=True):
            for i, value in zip(where, replies, strict=True):
                values[i] = value
        return values

    def _pool_of(self, key: str):
        try:
            return self.servers.pool_for((self.prefix + key).encode())
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def _live_pool(self, name: bytes):
        """The pool of ``name``'s server, unless it is a cluster node known to be down."""
        pool = self.servers.pool_for(name)
        if self.down and self.down.skip(pool):
            raise _NodeDown
        return pool

    def _refuse_down(self, keys: Iterable[str]) -> None:
        """An authoritative write to a down node's key fails now, without a call."""
        down = self.down
        if down and any(down.skip(self._pool_of(key)) for key in keys):
            raise TierUnavailable(
                f"L2 Redis at {redact_url(self.url)}: a cluster node holding some of these "
                f"keys is down; trying it again within {down.retry_s:g}s"
            )

    def _read(self, requests: Callable[[], list]) -> list:
        """The replies of ``requests()`` (per server: pool, packed commands, reader). A
        cluster that answers MOVED/ASK/TRYAGAIN/CLUSTERDOWN was resharded or is failing
        over: the slot map is read again and the requests planned and sent once more."""
        try:
            try:
                return self._exchange(requests())
            except _RESHARDED:
                self.servers.refresh()
                return self._exchange(requests())
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def _exchange(self, requests: Sequence[tuple]) -> list:
        """Send each request's commands on an idle connection of its pool, then read
        each one's replies (so the servers of a batch work at once). A reused idle
        connection the server closed makes the whole exchange start again once on new
        ones (as redis-py's pool does on checkout); a timeout is not retried (it is the
        tier's bound)."""
        try:
            return self._send_then_read(requests, reuse_idle=True)
        except _ClosedWhileIdle:
            return self._send_then_read(requests, reuse_idle=False)

    def _send_then_read(self, requests: Sequence[tuple], reuse_idle: bool) -> list:
        taken = []  # (pool, connection, whether it came off the idle list)
        pool = None  # the one being talked to
        try:
            for pool, packed, _ in requests:
                conn, reused = (
                    self._checkout(pool) if reuse_idle else (pool.get_connection(), False)
                )
                taken.append((pool, conn, reused))
                conn.send_packed_command((packed,))
            replies = []
            # (pool is read by the except clauses: the node that failed)
            for (pool, _, read), (_, conn, _) in zip(requests, taken, strict=True):  # noqa: B007
                replies.append(read(conn))
        except redis.ConnectionError as exc:
            self._discard(taken)
            if any(reused for *_, reused in taken):
                raise _ClosedWhileIdle from exc
            self._node_failed(pool, exc)
            raise
        except BaseException as exc:
            self._discard(taken)  # never reused with a reply left unread
            if isinstance(exc, redis.TimeoutError):
                self._node_failed(pool, exc)
            raise
        for pool, conn, _ in taken:
            self._idle_of(pool).append(conn)
        if self.down:
            self.down.answered(pool for pool, *_ in taken)
        return replies

    def _node_failed(self, pool, exc: Exception) -> None:
        """A cluster node did not answer: mark it down; quiet if it was down already."""
        if self.down is not None and pool is not None and self.down.failed(pool):
            raise _NodeDown from exc

    def _idle_of(self, pool) -> list:
        """The idle connections of ``pool``. The lists are this process's: after a fork
        the child starts its own (the parent's sockets are never used, nor shut down,
        from the child)."""
        if self._idle_pid != os.getpid():
            self._idle, self._idle_pid = {}, os.getpid()
        idle = self._idle.get(pool)
        return idle if idle is not None else self._idle.setdefault(pool, [])

    def _checkout(self, pool) -> tuple[Any, bool]:
        """An idle connection of ``pool`` (LIFO), else a new one from the pool."""
        try:
            return self._idle_of(pool).pop(), True
        except IndexError:
            return pool.get_connection(), False

    @staticmethod
    def _discard(taken: Iterable[tuple]) -> None:
        for pool, conn, _ in taken:
            conn.disconnect()  # _sock is None afterwards: not put back on the idle list
            pool.release(conn)

    def idle_connections(self) -> list:
        """The read path's idle connections, all pools together (for tests and stats)."""
        return [conn for idle in self._idle.values() for conn in idle]

    # -- writes ----------------------------------------------------------------------------
    def _pipeline(self, commands: Callable, announce: Sequence[str] = ()) -> None:
        """Run ``commands(pipe)`` in one pipeline, then announce ``announce`` (all of
        them in one message, in the same round trip on one server; a cluster pipeline
        refuses PUBLISH, so there it follows the pipeline)."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                commands(pipe)
                if announce and not self.servers.cluster:
                    pipe.publish(self.channel, self._message(announce))
                pipe.execute()
            if announce and self.servers.cluster:
                self._publish(announce)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def _message(self, keys: Sequence[str]) -> str:
        """``<sender>\\n<id>\\n<id>...``; no id is empty or holds a newline (ids are
        printable), so a message with no id at all means "drop all of L1"."""
        return "\n".join((self.sender, *keys))

    def _publish(self, keys: Sequence[str]) -> None:
        target = self.servers.publish_target(self.prefix + keys[0] if keys else None)
        self.client.publish(self.channel, self._message(keys), **target)

    def put_many(self, items: Sequence[tuple[str, bytes]], announce: bool = False) -> None:
        """Store framed values; ``announce`` also tells other processes to drop their L1 copy."""
        ttl = self._ttl_ms()
        self._refuse_down(key for key, _ in items)

        def commands(pipe) -> None:
            for key, blob in items:
                pipe.set(self.prefix + key, blob, px=ttl)

        self._pipeline(commands, [key for key, _ in items] if announce else ())

    def add_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Promote copies found below: only where the key is absent (see the module doc).
        A promotion is optional: none is sent to a cluster node known to be down."""
        ttl = self._ttl_ms()
        if self.down:
            items = [item for item in items if not self.down.skip(self._pool_of(item[0]))]

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
            self.client.eval(_DISCARD_IF_SAME, 1, self.prefix + key, blob)
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def fence_many(self, keys: Sequence[str], announce: bool = True) -> None:
        """Replace the copies with fences and tell other processes to drop their L1 copy."""
        self._refuse_down(keys)

        def commands(pipe) -> None:
            for key in keys:
                pipe.set(self.prefix + key, b"", px=self.fence_ms)

        self._pipeline(commands, keys if announce else ())

    def delete_many(self, keys: Sequence[str], announce: bool = True) -> None:
        """Plain delete (no fence): a later promotion may copy the value back."""
        self._refuse_down(keys)

        def commands(pipe) -> None:
            for key in keys:  # one key a command: on a cluster, keys live in many slots
                pipe.delete(self.prefix + key)

        self._pipeline(commands, keys if announce else ())

    def clear(self) -> None:
        """Delete every key under our prefix and tell other processes to drop their L1."""
        try:
            for batch in _batched(self.client.scan_iter(match=self.prefix + "*", count=1000), 1000):
                self.client.delete(*batch)  # redis-py splits it by slot on a cluster
            self._publish(())
        except REDIS_ERRORS as exc:
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
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from exc
        return {"entries": entries, "stored_bytes": stored}

    def ping(self) -> None:
        try:
            self.servers.ping()
        except REDIS_ERRORS as exc:
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        for pool, idle in list(self._idle.items()):
            while idle:
                pool.release(idle.pop())
        self.servers.close()  # disconnects in-use connections too


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
    whole L1: a cold L1 is slower, a stale one is wrong. On a cluster each reconnect
    tries the next node, so one node down does not silence the channel.
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
        self._thread = threading.Thread(target=self._run, name="esper-invalidation", daemon=True)
        self._thread.start()

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def _run(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._tier.servers.subscriber(attempt)
                attempt += 1
                pubsub.subscribe(self._tier.channel)
                # Every subscription, the first included: if Redis was down when the
                # cache was built, L1 may have filled before we could hear anything.
                self._on_gap()
                self._subscribed.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.1)  # also how long close() waits
                    if message and message["type"] == "message":
                        self._apply(message["data"].decode("utf-8", "replace"))
            except REDIS_ERRORS as exc:
                self._subscribed.clear()
                log.debug("invalidation listener lost Redis (%s); retrying", exc)
                self._stop.wait(0.5)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*REDIS_ERRORS):
                        pubsub.close()

    def _apply(self, message: str) -> None:
        sender, _, ids = message.partition("\n")
        if sender == self._tier.sender:
            return
        if not ids:  # see RedisTier._message: "drop all"
            self._on_gap()
            return
        for kernel_id in ids.split("\n"):
            self._on_invalidate(kernel_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
