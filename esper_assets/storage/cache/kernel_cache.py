"""PersistentKernelCache: L1 memory -> L2 Redis -> L3 PostgreSQL/SQLite -> L4 object store.

Reads fall through the tiers and promote what they find into the faster ones.
Writes go to every tier (write-through) or to the fast tiers first with dirty
keys flushed to the durable tier in the background (write-back). A remote tier
that fails costs one bounded timeout; then its circuit breaker skips it and
probes for recovery, and reads are served from the other tiers.

What write-back can lose: values acknowledged by ``put`` but not yet flushed
live in this process (and in Redis, if L2 is on). A clean ``close()`` flushes
them or raises :class:`FlushError`; a crash (kill -9, OOM) loses the writes of
at most the last ``write_back_interval_s`` seconds, bounded by
``write_back_max_dirty_bytes`` - except that copies in Redis stay readable by
other processes until their L2 TTL ends.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from esper_assets.errors import (
    ConfigError,
    CorruptValue,
    DurableWriteError,
    FlushError,
    InvalidKernelId,
    InvalidValue,
    StorageError,
    TierUnavailable,
)
from esper_assets.settings import Settings
from esper_assets.storage.cache import framing
from esper_assets.storage.cache.framing import Codec, Codecs, Payload
from esper_assets.storage.cache.resilience import CircuitBreaker, LatencyWindow, TierStats
from esper_assets.storage.cache.tiers.memory import MemoryTier
from esper_assets.storage.cache.tiers.objects import ObjectTier, kernel_object_key
from esper_assets.storage.cache.tiers.redis import InvalidationListener, RedisTier
from esper_assets.storage.cache.tiers.sql import IN_OBJECT_STORE, PostgresTier, Row, SqliteTier
from esper_assets.storage.objects import (
    DirectoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    make_s3_client,
)

log = logging.getLogger("esper_assets.storage.cache")

MAX_ID_LENGTH = 255
L2_DEBT_LIMIT = 100_000  # ids remembered while Redis is away; past this, L2 is cleared on return
CHANGE_LOG_PAGE = 10_000  # more changes than this between two looks: drop all of L1 instead
WRITE_MODES = ("write_through", "write_back")
_UNAVAILABLE = object()  # a tier that could not answer, as opposed to a miss


@dataclass
class CacheConfig:
    """Everything the cache needs; ``PersistentKernelCache.from_env`` fills the locations."""

    # L1 (in-process memory)
    l1_enabled: bool = True
    l1_size_mb: float = 256
    l1_ttl_seconds: float | None = 3600
    eviction_policy: str = "lru"  # lru, lfu, fifo
    admission: bool = True  # TinyLFU-style frequency admission in front of eviction
    # L2 (Redis)
    l2_enabled: bool = True  # and only when redis_url is set
    l2_ttl_seconds: float | None = 86400
    redis_url: str | None = None
    redis_prefix: str = "esper:kc:"
    # L3 (PostgreSQL, or SQLite embedded)
    l3_enabled: bool = True
    l3_ttl_seconds: float | None = 7 * 86400
    postgres_url: str | None = None
    sqlite_path: str | None = None
    # L4 (object store: S3 bucket, or a directory embedded)
    l4_enabled: bool = True
    l4_ttl_seconds: float | None = None  # archival: kept until invalidated
    object_store_path: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "esper"
    s3_endpoint_url: str | None = None
    archive_to_l4: bool = False  # also copy values below the threshold to L4
    large_object_threshold: int = 1 << 20  # above this: stored once in L4, pointer row in L3
    max_value_bytes: int = 512 << 20
    # behaviour
    enable_compression: bool = True
    compression: str = "zstd"  # zstd, gzip, none
    compression_level: int = 3
    enable_metrics: bool = True
    write_mode: str = "write_through"
    write_back_interval_s: float = 0.5
    write_back_max_dirty_bytes: int = 64 << 20
    warm_cache_on_startup: bool = False
    warm_startup_count: int = 100
    access_flush_interval_s: float = 5.0
    redis_timeout_s: float = 0.25
    sql_timeout_s: float = 3.0
    object_store_timeout_s: float = 2.0
    breaker_failure_threshold: int = 1
    breaker_reset_s: float = 2.0
    # invalidation (see docs/ARCHITECTURE.md, "Invalidation and staleness")
    invalidation_poll_s: float = 1.0  # how often L3's change log is read: the embedded bound
    invalidation_fence_s: float = 60.0  # how long an invalidated id refuses refills (L2, L3)

    def __post_init__(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise ConfigError(
                f"write_mode={self.write_mode!r} is unknown; use one of {list(WRITE_MODES)}"
            )
        if self.large_object_threshold <= 0 or self.max_value_bytes <= 0:
            raise ConfigError(
                "large_object_threshold and max_value_bytes must be positive byte counts"
            )
        for name in ("invalidation_poll_s", "invalidation_fence_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r}: use a positive number of seconds"
                )
        for name in ("l1_ttl_seconds", "l2_ttl_seconds", "l3_ttl_seconds", "l4_ttl_seconds"):
            ttl = getattr(self, name)
            if ttl is not None and ttl <= 0:
                raise ConfigError(
                    f"{name}={ttl!r}: use a positive number of seconds, or None for no expiry"
                )


@dataclass
class CacheEntry:
    """A value with what the durable tier knows about it."""

    key: str
    value: bytes
    metadata: dict[str, Any]
    created_at: datetime | None
    accessed_at: datetime
    ttl_seconds: float | None = None
    compressed: bool = False
    in_object_store: bool = False


@dataclass
class _Pending:
    """A value on its way into the tiers, encoded once."""

    key: str
    value: bytes
    payload: Payload
    metadata: Mapping[str, Any]
    created_ms: int
    large: bool
    version: int = 0  # write-back: which put this is, so a flush never drops a newer one


class _Flight:
    """One in-progress load; followers block on ``done`` (held by the leader until it ends)."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.value: bytes | None = None
        self.error: BaseException | None = None

    def wait(self) -> bytes | None:
        with self.done:
            pass
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class _WriteBack:
    dirty: dict[str, _Pending] = field(default_factory=dict)
    dirty_bytes: int = 0
    version: int = 0
    flushed: int = 0
    failures: int = 0
    last_error: str | None = None


def _is_valid_id(kernel_id: object) -> bool:
    try:
        check_kernel_id(kernel_id)
    except InvalidKernelId:
        return False
    return True


def check_kernel_id(kernel_id: object) -> str:
    if not isinstance(kernel_id, str):
        raise InvalidKernelId(f"kernel id must be a str, got {type(kernel_id).__name__}")
    if not kernel_id:
        raise InvalidKernelId("kernel id is empty; use the blueprint's content hash")
    if len(kernel_id) > MAX_ID_LENGTH:
        raise InvalidKernelId(
            f"kernel id is {len(kernel_id)} characters; the limit is {MAX_ID_LENGTH} "
            f"(starts {kernel_id[:32]!r}); use a hash"
        )
    if not kernel_id.isprintable():
        raise InvalidKernelId(f"kernel id {kernel_id!r} holds unprintable characters")
    return kernel_id


class PersistentKernelCache:
    """Multi-tier kernel cache; synchronous and thread-safe."""

    def __init__(
        self, config: CacheConfig | None = None, object_store: ObjectStore | None = None
    ) -> None:
        """``object_store``, when given, is L4 (and large-object home) instead of the one
        the config names; Dagster passes the store its S3 resource built."""
        self.config = config = config or CacheConfig()
        self._codecs = Codecs(
            config.compression if config.enable_compression else "none",
            config.compression_level,
            max_decoded_bytes=config.max_value_bytes,  # a forged frame cannot inflate past it
        )
        self._l1 = self._build_l1()
        self._l2 = self._build_l2()
        self._l4 = self._build_l4(object_store)
        self._l3 = self._build_l3()  # last: it applies migrations and may raise
        self._remote = [t for t in (self._l2, self._l3, self._l4) if t is not None]
        self._stats = {t.name: TierStats() for t in self._remote}
        self._breakers = {
            t.name: CircuitBreaker(config.breaker_failure_threshold, config.breaker_reset_s)
            for t in self._remote
        }
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="esper-cache")
        self._inflight: dict[str, _Flight] = {}
        self._inflight_lock = threading.Lock()
        self._access: dict[str, int] = {}
        self._wb = _WriteBack()
        self._wb_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._l2_debt: set[str] = (
            set()
        )  # ids whose L2 copy may be stale (see _note_missed_l2_write)
        self._l2_debt_overflow = False
        self._l2_debt_lock = threading.Lock()
        self._stale_to_share: list[str] = []  # L2 debt not yet written to L3's change log
        # Bumped before every L1 drop; a read that saw it move while it was loading
        # does not leave what it loaded in L1 (it may be the value just invalidated).
        self._l1_epoch = 0
        self._log_cursor: str | None = None
        self._log_retention_s = max(3600.0, config.l2_ttl_seconds or 7 * 86400.0)
        self.loads = 0  # lower-tier loads started by get(): single-flight keeps this low
        self._slow_requests = self._not_found = 0
        self._sample = 0
        self._l1_latency = LatencyWindow()
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._listener = (
            InvalidationListener(self._l2, self._drop_local, self._drop_all_local)
            if self._l2 is not None and self._l1 is not None
            else None
        )
        if self._listener is not None:
            # Pub/sub drops messages sent before we subscribe: wait (bounded) so that
            # invalidations published after this constructor returns reach our L1.
            self._listener.wait_subscribed(max(0.5, 4 * config.redis_timeout_s))
        self._read_change_log()  # from now on: a position to read other processes' changes from
        self._maintainer = threading.Thread(
            target=self._maintain, name="esper-cache-maintenance", daemon=True
        )
        self._maintainer.start()
        self.startup_warm: Future | None = None
        if config.warm_cache_on_startup and self._l3 is not None:
            self.startup_warm = self._pool.submit(
                self._warm_from_history, config.warm_startup_count
            )

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> PersistentKernelCache:
        return cls(cache_config_from_settings(Settings.from_env(environ), **overrides))

    def _build_l1(self) -> MemoryTier | None:
        c = self.config
        if not c.l1_enabled or c.l1_size_mb <= 0:
            return None
        return MemoryTier(
            int(c.l1_size_mb * (1 << 20)), c.l1_ttl_seconds, c.eviction_policy, c.admission
        )

    def _build_l2(self) -> RedisTier | None:
        c = self.config
        if not c.l2_enabled or not c.redis_url:
            return None
        return RedisTier(
            c.redis_url,
            c.redis_prefix,
            c.l2_ttl_seconds,
            c.redis_timeout_s,
            fence_seconds=c.invalidation_fence_s,
        )

    def _build_l3(self) -> PostgresTier | SqliteTier | None:
        c = self.config
        if not c.l3_enabled:
            return None
        if c.postgres_url:
            return PostgresTier(c.postgres_url, c.l3_ttl_seconds, timeout_s=c.sql_timeout_s)
        if c.sqlite_path:
            return SqliteTier(c.sqlite_path, c.l3_ttl_seconds)
        raise ConfigError(
            "L3 is enabled but CacheConfig has neither postgres_url nor sqlite_path; "
            "build the cache with PersistentKernelCache.from_env() or set one (or l3_enabled=False)"
        )

    def _build_l4(self, store: ObjectStore | None) -> ObjectTier | None:
        c = self.config
        if not c.l4_enabled:
            return None
        if store is not None:
            return ObjectTier(store, c.l4_ttl_seconds)
        if c.s3_bucket:
            client = make_s3_client(c.s3_endpoint_url, c.object_store_timeout_s)
            return ObjectTier(S3ObjectStore(client, c.s3_bucket, c.s3_prefix), c.l4_ttl_seconds)
        if c.object_store_path:
            return ObjectTier(DirectoryObjectStore(c.object_store_path), c.l4_ttl_seconds)
        return None

    @property
    def tiers(self) -> list[str]:
        return (["l1"] if self._l1 is not None else []) + [t.name for t in self._remote]

    # -- reads --------------------------------------------------------------------
    def get(self, kernel_id: str) -> bytes | None:
        access = self._access
        try:
            access[kernel_id] = access.get(kernel_id, 0) + 1
        except TypeError:  # unhashable, so certainly not an id
            check_kernel_id(kernel_id)
        l1 = self._l1
        if l1 is not None:
            if self.config.enable_metrics:
                # Time one L1 read in 64: timing every one would double its cost.
                self._sample = (self._sample + 1) & 63
                if not self._sample:
                    return self._timed_l1_get(kernel_id)
            value = l1.get(kernel_id)
            if value is not None:
                return value
        # A bad id can never be in L1, so ids are checked only on the way down.
        return self._get_slow(check_kernel_id(kernel_id))

    def _timed_l1_get(self, kernel_id: str) -> bytes | None:
        start = time.perf_counter()
        value = self._l1.get(kernel_id)
        if value is not None:
            self._l1_latency.record(time.perf_counter() - start)
            return value
        return self._get_slow(check_kernel_id(kernel_id))

    def _get_slow(self, kernel_id: str) -> bytes | None:
        self._slow_requests += 1
        pending = self._wb.dirty.get(kernel_id)
        if pending is not None:
            return pending.value
        value = self._load_once(kernel_id)
        if value is None:
            self._not_found += 1
        return value

    def _load_once(self, kernel_id: str) -> bytes | None:
        """Single-flight: concurrent misses on one id share one lower-tier load."""
        with self._inflight_lock:
            flight = self._inflight.get(kernel_id)
            leader = flight is None
            if leader:
                flight = self._inflight[kernel_id] = _Flight()
                self.loads += 1
        if not leader:
            return flight.wait()
        try:
            flight.value = self._read_through([kernel_id]).get(kernel_id)
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._inflight_lock:
                del self._inflight[kernel_id]
            flight.done.release()

    def get_many(self, kernel_ids: Iterable[str]) -> dict[str, bytes]:
        """Values for the ids that exist; one round trip per tier for the rest."""
        ids = list(dict.fromkeys([check_kernel_id(k) for k in kernel_ids]))
        found = self._l1.get_many(ids) if self._l1 is not None else {}
        for kernel_id in ids:
            self._access[kernel_id] = self._access.get(kernel_id, 0) + 1
        missing = [k for k in ids if k not in found]
        self._slow_requests += len(missing)
        for kernel_id in missing:
            pending = self._wb.dirty.get(kernel_id)
            if pending is not None:
                found[kernel_id] = pending.value
        missing = [k for k in missing if k not in found]
        if missing:
            loaded = self._read_through(missing)
            self._not_found += len(missing) - len(loaded)
            found.update(loaded)
        return found

    def get_entry(self, kernel_id: str) -> CacheEntry | None:
        value = self.get(kernel_id)
        if value is None:
            return None
        info = self._tier_call(self._l3, "metadata", kernel_id) if self._l3 is not None else None
        info = info if isinstance(info, dict) else {}
        created = info.get("created_at")
        return CacheEntry(
            key=kernel_id,
            value=value,
            metadata=info.get("metadata", {}),
            created_at=datetime.fromtimestamp(created, UTC) if created else None,
            accessed_at=datetime.now(UTC),
            ttl_seconds=self.config.l3_ttl_seconds,
            compressed=self.config.enable_compression,
            in_object_store=info.get("in_object_store", False),
        )

    def _read_through(
        self, ids: Sequence[str], report: dict[str, str] | None = None
    ) -> dict[str, bytes]:
        """Walk L2 -> L3 -> L4 for ``ids``, promoting hits into the tiers above."""
        epoch = self._l1_epoch
        found: dict[str, bytes] = {}
        missing = list(ids)
        pointers: set[str] = set()  # ids whose L3 row says "the value is in L4"
        look_lower: set[str] = set()  # pointers, and ids whose L3 copy was corrupt
        answered: list = []  # tiers that answered (and missed): promotion targets
        for tier in self._remote:
            want = (
                self._l4_candidates(missing, look_lower, answered) if tier is self._l4 else missing
            )
            if not want:
                continue
            answer = self._fetch(tier, want)
            if answer is _UNAVAILABLE:
                continue
            hits, nbytes = {}, 0
            for key, blob in answer.items():
                if blob is IN_OBJECT_STORE:
                    pointers.add(key)
                    look_lower.add(key)
                    continue
                nbytes += len(blob)
                if (decoded := self._decode(tier, key, blob)) is not None:
                    hits[key] = decoded
                elif tier is self._l3:
                    look_lower.add(key)
                elif tier is self._l2:
                    self._tier_call(tier, "discard", key, blob)
            self._stats[tier.name].add_lookup(len(hits), len(want) - len(hits), nbytes)
            self._promote(hits, answered, pointers)
            for key, (value, _) in hits.items():
                found[key] = value
                if report is not None:
                    report[key] = tier.name
            answered.append(tier)
            missing = [k for k in missing if k not in hits]
        self._fill_l1(found, epoch)
        return found

    def _fill_l1(self, found: dict[str, bytes], epoch: int) -> None:
        """Keep what a read loaded in L1, unless an invalidation arrived meanwhile.

        Put first, then look: an invalidation that lands between the two is seen
        here, one that lands after the look drops the fresh copy itself.
        """
        if self._l1 is None or not found:
            return
        for key, value in found.items():
            self._l1.put(key, value)
        if self._l1_epoch != epoch:
            for key in found:
                self._l1.delete(key)

    def _fetch(self, tier, keys: list[str]) -> dict[str, Any] | object:
        if len(keys) > 1:
            return self._tier_call(tier, "get_many", keys)
        blob = self._tier_call(tier, "get", keys[0])  # cheaper than a one-element batch
        if blob is _UNAVAILABLE or blob is None:
            return {} if blob is None else blob
        return {keys[0]: blob}

    def _l4_candidates(self, missing: list[str], look_lower: set[str], answered: list) -> list[str]:
        # When L3 answered, L4 holds only the large values L3 pointed at (unless archiving),
        # so a plain miss costs no object-store round trip.
        if self.config.archive_to_l4 or self._l3 is None or self._l3 not in answered:
            return missing
        return [k for k in missing if k in look_lower]

    def _decode(self, tier, key: str, blob: bytes) -> tuple[bytes, framing.Frame] | None:
        try:
            frame = framing.unpack(blob)
            if frame.expired(framing.now_ms()):
                return None
            return self._codecs.decode(frame), frame
        except CorruptValue as exc:
            self._stats[tier.name].add("corruptions")
            log.warning(
                "corrupt value for kernel %r in %s (%s); repairing from a lower tier",
                key,
                tier.name,
                exc,
            )
            return None

    def _promote(
        self, hits: dict[str, tuple[bytes, framing.Frame]], upper: list, pointers: set[str]
    ) -> None:
        """Copy hits into the faster tiers that missed them (this also repairs corrupt copies)."""
        if not hits or not upper:
            return
        entries = [
            _Pending(
                key,
                value,
                Payload.of(frame.codec, frame.payload, len(value)),
                {},
                frame.created_ms,
                self._is_large(len(value)),
            )
            for key, (value, frame) in hits.items()
        ]
        for tier in upper:
            batch = [
                e
                for e in entries
                if self._belongs_in(tier, e) and not (tier is self._l3 and e.key in pointers)
            ]
            if batch:
                self._tier_call(tier, "promote", batch)

    # -- writes -------------------------------------------------------------------
    def put(
        self, kernel_id: str, data: bytes, metadata: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Store ``data``; return the tiers that hold it now.

        Write-through returns once the durable tier has it and raises
        :class:`DurableWriteError` otherwise. Write-back returns once the fast
        tiers have it (see the module docstring for what a crash can lose).
        """
        entry = self._prepare(kernel_id, data, metadata)
        if self.config.write_mode == "write_back":
            return self._put_back(entry)
        return self._put_through([entry])

    def put_many(self, items: Iterable[tuple[str, bytes]] | Mapping[str, bytes]) -> list[str]:
        pairs = items.items() if isinstance(items, Mapping) else items
        entries = [self._prepare(k, v, None) for k, v in pairs]
        if self.config.write_mode == "write_back":
            written: list[str] = []
            for entry in entries:
                written = self._put_back(entry)
            return written
        return self._put_through(entries)

    def _prepare(self, kernel_id: str, data: bytes, metadata: Mapping[str, Any] | None) -> _Pending:
        self._check_open()
        check_kernel_id(kernel_id)
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise InvalidValue(
                f"value for kernel {kernel_id!r} must be bytes, got {type(data).__name__}"
            )
        if len(data) > self.config.max_value_bytes:
            raise InvalidValue(
                f"value for kernel {kernel_id!r} is {len(data)} bytes, over max_value_bytes="
                f"{self.config.max_value_bytes}; raise CacheConfig.max_value_bytes if this is intended"
            )
        try:
            metadata = dict(metadata or {})
            # allow_nan=False: NaN/Infinity are not JSON; L3 would refuse them at write time.
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidValue(
                f"metadata for kernel {kernel_id!r} is not JSON-serialisable: {exc}"
            ) from None
        return _Pending(
            kernel_id,
            data,
            self._codecs.encode(data),
            metadata,
            framing.now_ms(),
            self._is_large(len(data)),
        )

    def _is_large(self, size: int) -> bool:
        return self._l4 is not None and size > self.config.large_object_threshold

    def _belongs_in(self, tier, entry: _Pending) -> bool:
        if tier is self._l2:
            return not entry.large
        if tier is self._l4:
            return entry.large or self.config.archive_to_l4 or self._l3 is None
        return True

    def _put_through(self, entries: list[_Pending]) -> list[str]:
        fast = [t for t in self._remote if not self._is_durable_for(t, entries)]
        side = {t: self._pool.submit(self._best_effort_store, t, entries) for t in fast}
        try:
            self._persist(entries)
        except BaseException:
            for tier, future in side.items():
                future.result()
                if tier is self._l2:  # never leave a value readable that was not stored durably
                    # (a plain delete: the durable copy is still the old one, so a reader
                    # that promotes it again is right)
                    self._tier_call(tier, "delete_many", [e.key for e in entries])
            raise
        written = [t.name for t, f in side.items() if f.result()]
        written += [t.name for t in self._durable_tiers(entries)]
        if self._l1 is not None:
            stored = [self._l1.put(e.key, e.value) for e in entries]
            if all(stored):
                written.insert(0, "l1")
        return sorted(written)

    def _durable_tiers(self, entries: list[_Pending]) -> list:
        """Tiers a put must reach before it is acknowledged, objects before pointers."""
        tiers = []
        if self._l4 is not None and (self._l3 is None or any(e.large for e in entries)):
            tiers.append(self._l4)
        if self._l3 is not None:
            tiers.append(self._l3)
        return tiers

    def _is_durable_for(self, tier, entries: list[_Pending]) -> bool:
        return tier in self._durable_tiers(entries)

    def _persist(self, entries: list[_Pending]) -> None:
        """Write to the durable tiers (L4 objects before the L3 rows that point at them)."""
        for tier in self._durable_tiers(entries):
            batch = [e for e in entries if self._belongs_in(tier, e)]
            if batch:
                self._durable_call(tier, batch)

    def _durable_call(self, tier, batch: list[_Pending]) -> None:
        breaker = self._breakers[tier.name]
        if not breaker.allow():
            raise DurableWriteError(
                f"{tier.name} is unavailable (circuit open after: {breaker.last_error}); "
                f"{len(batch)} value(s) NOT stored, retry after {self.config.breaker_reset_s}s"
            )
        try:
            self._store(tier, batch)
        except TierUnavailable as exc:
            breaker.failure(exc)
            self._stats[tier.name].add("errors")
            raise DurableWriteError(f"{exc}; {len(batch)} value(s) NOT stored") from exc
        except StorageError as exc:
            self._stats[tier.name].add("errors")
            raise DurableWriteError(f"{exc}; {len(batch)} value(s) NOT stored") from exc
        breaker.success()
        self._stats[tier.name].add_writes(len(batch), sum(len(e.payload.data) for e in batch))

    def _best_effort_store(self, tier, entries: list[_Pending]) -> bool:
        latest = {e.key: e for e in entries}  # an id given twice: its last value wins
        batch = [e for e in latest.values() if self._belongs_in(tier, e)]
        if tier is self._l2:
            # A value that skips L2 (large) must not leave an older copy there to be read.
            skipped = [key for key, e in latest.items() if not self._belongs_in(tier, e)]
            if skipped:
                self._tier_call(tier, "fence_many", skipped)
        return bool(batch) and self._tier_call(tier, "store", batch) is not _UNAVAILABLE

    def _store(self, tier, batch: list[_Pending], promote: bool = False) -> None:
        """Write ``batch`` to ``tier``. A promotion (a copy found below) may be older
        than a put or an invalidation made meanwhile: it never replaces what is in L2,
        and L3 takes it only for ids not invalidated in the last fence period."""
        if tier is self._l3:
            rows = [self._row(e) for e in batch]
            if promote:
                tier.put_many(rows, fence_s=self.config.invalidation_fence_s)
            else:
                tier.put_many(rows)
            return
        blobs = [
            (e.key, framing.pack(e.payload, e.created_ms, self._expires_ms(tier))) for e in batch
        ]
        if tier is not self._l2:
            tier.put_many(blobs)
        elif promote:
            tier.add_many(blobs)
        else:
            tier.put_many(blobs, announce=True)

    def _row(self, e: _Pending) -> Row:
        inline = not e.large
        blob = framing.pack(e.payload, e.created_ms, self._expires_ms(self._l3)) if inline else None
        expires = self._expires_ms(self._l3)
        return Row(
            key=e.key,
            data=blob,
            object_key=None if inline else kernel_object_key(e.key),
            metadata=e.metadata,
            size_bytes=len(e.value),
            stored_bytes=len(blob)
            if blob is not None
            else len(e.payload.data) + framing.HEADER_SIZE,
            compressed=e.payload.codec is not Codec.NONE,
            created_at=e.created_ms / 1000,
            expires_at=expires / 1000 if expires else None,
        )

    @staticmethod
    def _expires_ms(tier) -> int:
        ttl = tier.ttl_seconds
        return framing.now_ms() + int(ttl * 1000) if ttl else 0

    # -- write-back ---------------------------------------------------------------
    def _put_back(self, entry: _Pending) -> list[str]:
        wb = self._wb
        with self._wb_lock:
            wb.version += 1
            entry.version = wb.version
            old = wb.dirty.get(entry.key)
            wb.dirty_bytes += len(entry.payload.data) - (len(old.payload.data) if old else 0)
            wb.dirty[entry.key] = entry
            over = wb.dirty_bytes > self.config.write_back_max_dirty_bytes
        written = ["l1"] if self._l1 is not None and self._l1.put(entry.key, entry.value) else []
        if self._l2 is not None and self._best_effort_store(self._l2, [entry]):
            written.append("l2")
        if over:
            self.flush()  # back-pressure: a writer faster than the durable tier waits for it
        # Otherwise the maintenance thread flushes every write_back_interval_s, in one batch.
        return written

    def flush(self) -> int:
        """Write every dirty key to the durable tier now; raise FlushError if that fails."""
        with self._flush_lock:  # an invalidate() must not interleave with a flush of its id
            return self._flush_locked()

    def _flush_locked(self) -> int:
        with self._wb_lock:
            batch = list(self._wb.dirty.values())
        if not batch:
            return 0
        try:
            self._persist(batch)
        except DurableWriteError as exc:
            with self._wb_lock:
                self._wb.failures += 1
                self._wb.last_error = str(exc)
                count = len(self._wb.dirty)
            raise FlushError(
                f"{count} dirty kernel(s) not persisted, still held in memory: {exc}"
            ) from exc
        with self._wb_lock:
            for entry in batch:
                current = self._wb.dirty.get(entry.key)
                if current is not None and current.version == entry.version:
                    del self._wb.dirty[entry.key]
                    self._wb.dirty_bytes -= len(entry.payload.data)
            self._wb.flushed += len(batch)
        return len(batch)

    # -- invalidation, warming, cleanup ------------------------------------------
    def invalidate(self, kernel_id: str) -> None:
        """Remove ``kernel_id`` from every tier and from other processes' L1."""
        check_kernel_id(kernel_id)
        # Taking the flush lock waits out an in-flight flush that may hold this id,
        # so its upsert cannot land after our delete and bring the value back.
        with self._flush_lock, self._wb_lock:
            pending = self._wb.dirty.pop(kernel_id, None)
            if pending is not None:
                self._wb.dirty_bytes -= len(pending.payload.data)
        # Durable copies first, then the fast ones: a reader that misses L2 after this
        # finds nothing below, and one that read L3 before is fenced (L2, L1).
        l3_failed = False
        for tier in (self._l3, self._l4):
            if tier is not None and not self._delete_from(tier, kernel_id):
                l3_failed |= tier is self._l3
        self._drop_local(kernel_id)
        if self._l2 is not None:
            self._delete_from(self._l2, kernel_id)
        if l3_failed:
            raise DurableWriteError(
                f"invalidate({kernel_id!r}): L3 could not delete it ({self._breakers['l3'].last_error}); "
                "it may come back after this process's L1 forgets it - retry"
            )

    def _delete_from(self, tier, kernel_id: str) -> bool:
        op = "fence_many" if tier is self._l2 else "delete_many"
        if self._tier_call(tier, op, [kernel_id]) is _UNAVAILABLE:
            return False
        self._stats[tier.name].add("deletes")
        return True

    def _drop_local(self, kernel_id: str) -> None:
        if self._l1 is not None:
            self._l1_epoch += 1
            self._l1.delete(kernel_id)

    def _drop_all_local(self) -> None:
        if self._l1 is not None:
            self._l1_epoch += 1
            self._l1.clear()

    def warm_cache(self, kernel_ids: Iterable[str]) -> dict[str, str]:
        """Load ids into the fast tiers, in the order given (highest priority first).

        Returns per id: ``"l1"`` (already hot), the tier it was loaded from, or ``"missing"``.
        """
        report: dict[str, str] = {}
        for kernel_id in kernel_ids:
            kernel_id = check_kernel_id(kernel_id)
            if self._l1 is not None and kernel_id in self._l1:
                report[kernel_id] = "l1"
                continue
            self._read_through([kernel_id], report)
            report.setdefault(kernel_id, "missing")
        return report

    def _warm_from_history(self, n: int) -> dict[str, str]:
        ids = self._tier_call(self._l3, "hottest", n)
        return {} if ids is _UNAVAILABLE else self.warm_cache(ids)

    def hottest(self, n: int = 100) -> list[str]:
        """The most accessed kernel ids (access counts are flushed to L3 periodically)."""
        self._flush_access_counts()
        ids = self._tier_call(self._l3, "hottest", n) if self._l3 is not None else _UNAVAILABLE
        return [] if ids is _UNAVAILABLE else ids

    def cleanup(self) -> dict[str, int]:
        """Remove expired entries from every tier; return how many per tier."""
        removed = {"l1": self._l1.cleanup() if self._l1 is not None else 0}
        for tier in self._remote:
            args = (self._log_retention_s,) if tier is self._l3 else ()
            gone = self._tier_call(tier, "cleanup", *args)
            if gone is _UNAVAILABLE:
                removed[tier.name] = -1
                continue
            removed[tier.name] = len(gone)
            if tier is self._l3 and self._l4 is not None:
                orphans = [key for key, object_key in gone if object_key]
                if orphans:
                    self._tier_call(self._l4, "delete_many", orphans)
        return removed

    # -- plumbing -----------------------------------------------------------------
    def _tier_call(self, tier, op: str, *args):
        """Call ``tier.op`` behind its breaker; return _UNAVAILABLE instead of raising."""
        name = tier.name
        breaker = self._breakers[name]
        if not breaker.allow():
            self._stats[name].add("skipped")
            self._note_missed_l2_write(tier, op, args)
            return _UNAVAILABLE
        start = time.perf_counter()
        try:
            if tier is self._l2 and (self._l2_debt or self._l2_debt_overflow):
                self._settle_l2_debt()  # before any read, so a stale copy is never served
            if op in ("store", "promote"):
                result = self._store(tier, *args, promote=op == "promote")
            else:
                result = getattr(tier, op)(*args)
        except TierUnavailable as exc:
            was = breaker.state
            breaker.failure(exc)
            self._stats[name].add("errors")
            if breaker.state != was:
                log.warning(
                    "%s unavailable, skipping it for %.1fs: %s", name, breaker.reset_after_s, exc
                )
            self._note_missed_l2_write(tier, op, args)
            return _UNAVAILABLE
        except StorageError as exc:
            self._stats[name].add("errors")
            log.warning("%s %s failed: %s", name, op, exc)
            self._note_missed_l2_write(tier, op, args)
            return _UNAVAILABLE
        if breaker.state != "closed":
            log.info("%s is back", name)
        breaker.success()
        if op in ("store", "promote"):
            self._stats[name].add_writes(len(args[0]), sum(len(e.payload.data) for e in args[0]))
        elif op in ("get", "get_many") and self.config.enable_metrics:
            self._stats[name].latency.record(time.perf_counter() - start)
        return result

    def _note_missed_l2_write(self, tier, op: str, args: tuple) -> None:
        """Remember ids whose put or invalidate did not reach L2.

        A Redis that was paused or cut off (not restarted empty) still holds their
        old values, or may even apply the timed-out write late; when it answers
        again those ids are deleted there before anyone can read them.
        """
        if tier is not self._l2 or op not in ("store", "fence_many", "delete_many"):
            return
        keys = [e.key for e in args[0]] if op == "store" else list(args[0])
        with self._l2_debt_lock:
            self._l2_debt.update(keys)
            if len(self._l2_debt) > L2_DEBT_LIMIT:  # too many to track: drop all of L2 instead
                self._l2_debt.clear()
                self._l2_debt_overflow = True
            if self._l3 is not None and len(self._stale_to_share) < L2_DEBT_LIMIT:
                self._stale_to_share.extend(keys)
        self._wake.set()  # tell the other processes now, from the maintenance thread

    def _settle_l2_debt(self) -> None:
        """Delete the possibly stale ids from L2; on failure keep them and re-raise."""
        with self._l2_debt_lock:
            keys, self._l2_debt = list(self._l2_debt), set()
            overflow, self._l2_debt_overflow = self._l2_debt_overflow, False
        try:
            if overflow:
                self._l2.clear()
            for i in range(0, len(keys), 1000):
                self._l2.fence_many(keys[i : i + 1000], announce=True)
        except StorageError:
            with self._l2_debt_lock:
                self._l2_debt.update(keys)
                self._l2_debt_overflow |= overflow
            raise

    def _maintain(self) -> None:
        c = self.config
        interval = min(c.access_flush_interval_s, c.invalidation_poll_s)
        if c.write_mode == "write_back":
            interval = min(interval, c.write_back_interval_s)
        last_access_flush = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self._share_l2_debt()
            self._read_change_log()
            if c.write_mode == "write_back" and self._wb.dirty:
                try:
                    self.flush()
                except FlushError as exc:
                    log.warning("write-back flush failed, will retry: %s", exc)
                    self._stop.wait(min(5.0, interval * 4))
            if time.monotonic() - last_access_flush >= c.access_flush_interval_s:
                self._flush_access_counts()
                last_access_flush = time.monotonic()

    def _flush_access_counts(self) -> None:
        counts, self._access = self._access, {}
        # get() counts before it checks the id (the L1 hit path stays a dict lookup), so
        # a bad id may be here: one would make the database refuse the whole batch.
        counts = {k: n for k, n in counts.items() if _is_valid_id(k) and n > 0}
        if counts and self._l3 is not None:
            self._tier_call(self._l3, "record_access", counts)

    # -- other processes' changes (L3's change log, sql/*/004) -----------------------
    def _read_change_log(self) -> None:
        """Drop from L1 what other processes deleted or overwrote in L3 since the last
        look, and take on their L2 debt (ids whose Redis copy they could not update)."""
        if self._l3 is None or (self._l1 is None and self._l2 is None):
            return
        starting = self._log_cursor is None
        changes = self._tier_call(
            self._l3, "changes_since", self._log_cursor, CHANGE_LOG_PAGE, self._log_retention_s
        )
        if changes is _UNAVAILABLE:
            return
        if changes.ids is None or starting:
            # Too much changed, or (starting late, L3 was away) L1 may have filled
            # before we knew where the log stood.
            self._drop_all_local()
        else:
            for kernel_id in changes.ids:
                self._drop_local(kernel_id)
        if changes.l2_stale and self._l2 is not None:
            with self._l2_debt_lock:
                self._l2_debt.update(changes.l2_stale)
        self._log_cursor = changes.cursor

    def _share_l2_debt(self) -> None:
        """Write this process's L2 debt to L3, where every process reads it."""
        with self._l2_debt_lock:
            keys, self._stale_to_share = self._stale_to_share, []
        if not keys or self._tier_call(self._l3, "mark_l2_stale", keys) is not _UNAVAILABLE:
            return
        if self._breakers[self._l3.name].state == "closed":
            # L3 answered and refused (a read-only replica, say): no retry can help.
            log.warning(
                "L3 refused to record %d id(s) whose Redis copy may be stale; other "
                "processes may read them from L2 until their TTL",
                len(keys),
            )
            return
        with self._l2_debt_lock:  # unreachable: try again on the next tick
            self._stale_to_share[:0] = keys

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("this PersistentKernelCache is closed; build a new one")

    # -- observability ---------------------------------------------------------------
    def get_stats(self, include_sizes: bool = False) -> dict[str, Any]:
        tiers: dict[str, Any] = {}
        l1_hits = 0
        if self._l1 is not None:
            l1 = self._l1.stats()
            l1_hits = l1["hits"]
            tiers["l1"] = {**l1, **self._l1_latency.percentiles_us()}
        for tier in self._remote:
            stats = self._stats[tier.name].snapshot()
            stats["breaker"] = self._breakers[tier.name].state
            if include_sizes:
                size = self._tier_call(tier, "size")
                stats.update(
                    size if isinstance(size, dict) else {"entries": None, "stored_bytes": None}
                )
            tiers[tier.name] = stats
        requests = l1_hits + self._slow_requests
        hits = requests - self._not_found
        with self._wb_lock:
            wb = asdict(self._wb)
            wb.pop("dirty")
            wb["dirty"] = len(self._wb.dirty)
        return {
            "tiers": tiers,
            "requests": requests,
            "hits": hits,
            "misses": self._not_found,
            "overall_hit_rate": round(hits / requests, 4) if requests else None,
            "loads": self.loads,
            "write_mode": self.config.write_mode,
            "write_back": wb,
        }

    def health(self) -> dict[str, dict[str, Any]]:
        report: dict[str, dict[str, Any]] = {}
        if self._l1 is not None:
            report["l1"] = {
                "status": "healthy",
                "usage_percent": round(100 * self._l1.used_bytes / self._l1.max_bytes, 1),
            }
        for tier in self._remote:
            start = time.perf_counter()
            try:
                tier.ping()
                report[tier.name] = {
                    "status": "healthy",
                    "latency_ms": round((time.perf_counter() - start) * 1e3, 2),
                }
            except StorageError as exc:
                report[tier.name] = {"status": "unavailable", "error": str(exc)}
            report[tier.name]["breaker"] = self._breakers[tier.name].state
        return report

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Flush write-back and access counts, then release connections.

        Raises FlushError (and stays open, so you can retry) if dirty keys cannot be persisted.
        """
        if self._closed:
            return
        if self.config.write_mode == "write_back":
            self.flush()
        self._stop.set()
        self._wake.set()
        self._maintainer.join(timeout=5)
        self._flush_access_counts()
        self._share_l2_debt()
        if self._stale_to_share:
            log.warning(
                "closing with %d id(s) whose Redis copy may be stale and that L3 could not "
                "record; other processes may read them from L2 until their TTL",
                len(self._stale_to_share),
            )
        self._closed = True
        if self._listener is not None:
            self._listener.close()
        self._pool.shutdown(wait=True)
        for tier in self._remote:
            tier.close()

    def __enter__(self) -> PersistentKernelCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def cache_config_from_settings(settings: Settings, **overrides: Any) -> CacheConfig:
    values: dict[str, Any] = {
        "redis_url": settings.redis_url,
        "postgres_url": settings.database_url,
        "sqlite_path": None if settings.database_url else str(settings.sqlite_path),
        "s3_bucket": settings.s3_bucket,
        "s3_prefix": settings.s3_prefix,
        "s3_endpoint_url": settings.aws_endpoint_url,
        "object_store_path": None if settings.s3_bucket else str(Path(settings.objects_dir)),
    }
    values.update(overrides)
    return CacheConfig(**values)
