"""The tiers of one cache, each in its slot.

L1 (:class:`MemoryTier`) cannot fail and is used directly. Each remote tier (L2
Redis, L3 SQL, L4 objects) sits in a :class:`TierSlot` with its level name, its
circuit breaker and its stats; every call to it goes through the slot
(:meth:`TierSlot.call`), which returns :data:`UNAVAILABLE` instead of raising.
What differs between the levels lives in the slot's class: how a batch is
written (:meth:`TierSlot.write`), which values a level holds
(:meth:`TierSlot.takes`), how an invalidation removes a copy
(:meth:`TierSlot.remove`). :class:`TierSlots` holds them in waterfall order,
with L1 and the epoch that keeps a read from refilling L1 with a value
invalidated while it was loading.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from esper_assets.errors import ConfigError, DurableWriteError, StorageError, TierUnavailable
from esper_assets.storage.cache import framing
from esper_assets.storage.cache.config import CacheConfig
from esper_assets.storage.cache.framing import Codec, Payload
from esper_assets.storage.cache.l2_debt import L2Debt
from esper_assets.storage.cache.resilience import CircuitBreaker, TierStats
from esper_assets.storage.cache.tiers.memory import MemoryTier
from esper_assets.storage.cache.tiers.objects import ObjectTier, kernel_object_key
from esper_assets.storage.cache.tiers.redis import RedisTier
from esper_assets.storage.cache.tiers.sql import PostgresTier, Row, SqliteTier
from esper_assets.storage.objects import (
    DirectoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    make_s3_client,
)

log = logging.getLogger("esper_assets.storage.cache")

UNAVAILABLE = object()  # a tier that could not answer, as opposed to a miss
LEVELS = ("l1", "l2", "l3", "l4")


@dataclass
class Pending:
    """A value on its way into the tiers, encoded once."""

    key: str
    value: bytes
    payload: Payload
    metadata: Mapping[str, Any]
    created_ms: int
    large: bool
    version: int = 0  # write-back: which put this is, so a flush never drops a newer one

    @classmethod
    def found(cls, key: str, value: bytes, frame: framing.Frame, large: bool) -> Pending:
        """A copy read from a lower tier, to promote as it was stored (codec, creation time)."""
        payload = Payload.of(frame.codec, frame.payload, len(value))
        return cls(key, value, payload, {}, frame.created_ms, large)


class TierSlot:
    """One remote tier in its place: level name, tier, circuit breaker and stats.

    ``breaker`` may be replaced (a test gives it a clock of its own); ``tier`` is the
    tier object itself, for callers that know what they are asking of it.
    """

    debt: L2Debt | None = None  # L2 only: ids whose copy there may be stale

    def __init__(self, tier: Any, config: CacheConfig) -> None:
        self.tier = tier
        self.level: str = tier.name
        self.breaker = CircuitBreaker(config.breaker_failure_threshold, config.breaker_reset_s)
        self.stats = TierStats()
        self._config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.level} breaker={self.breaker.state}>"

    # -- guarded calls -----------------------------------------------------------------
    def call(self, method: Callable, *args: Any, missed: Sequence[str] | None = None) -> Any:
        """``method(*args)`` (a method of this slot's tier) behind the breaker; return
        UNAVAILABLE instead of raising. ``missed``: the ids whose L2 copy may stay stale
        if the call does not happen (an L2 put, fence or delete)."""
        return self._guarded(method.__name__, method, args, missed)

    def fetch(self, keys: list[str]) -> dict[str, Any] | object:
        """Framed values (or IN_OBJECT_STORE pointers) of the ``keys`` this tier holds."""
        if len(keys) > 1:
            return self._guarded("get_many", self.tier.get_many, (keys,), timed=True)
        # cheaper than a one-element batch
        blob = self._guarded("get", self._get_one(), (keys[0],), timed=True)
        if blob is UNAVAILABLE or blob is None:
            return {} if blob is None else blob
        return {keys[0]: blob}

    def _get_one(self) -> Callable:
        return self.tier.get

    def store(self, batch: list[Pending]) -> Any:
        """Write ``batch`` (a put's values) behind the breaker."""
        missed = [e.key for e in batch] if self.debt is not None else None
        return self._guarded("store", self.write, (batch,), missed, written=batch)

    def promote(self, batch: list[Pending]) -> Any:
        """Write copies found in a lower tier behind the breaker (see :meth:`write`)."""
        return self._guarded("promote", self.write, (batch, True), written=batch)

    def _guarded(
        self,
        op: str,
        method: Callable,
        args: tuple,
        missed: Sequence[str] | None = None,
        written: list[Pending] | None = None,
        timed: bool = False,
    ) -> Any:
        """The one way in to a remote tier but :meth:`store_durably` (which raises):
        breaker, L2 debt, stats; ``op`` names the call in log messages."""
        name = self.level
        breaker = self.breaker
        if not breaker.allow():
            self.stats.add("skipped")
            self._note_missed(missed)
            return UNAVAILABLE
        start = time.perf_counter()
        try:
            if self.debt is not None and self.debt.owed:
                self.debt.settle(self.tier)  # before any read, so a stale copy is never served
            result = method(*args)
        except TierUnavailable as exc:
            was = breaker.state
            breaker.failure(exc)
            self.stats.add("errors")
            if breaker.state != was:
                log.warning(
                    "%s unavailable, skipping it for %.1fs: %s", name, breaker.reset_after_s, exc
                )
            self._note_missed(missed)
            return UNAVAILABLE
        except StorageError as exc:
            self.stats.add("errors")
            log.warning("%s %s failed: %s", name, op, exc)
            self._note_missed(missed)
            return UNAVAILABLE
        if breaker.state != "closed":
            log.info("%s is back", name)
        breaker.success()
        if written is not None:
            self.stats.add_writes(len(written), sum(len(e.payload.data) for e in written))
        elif timed and self._config.enable_metrics:
            self.stats.latency.record(time.perf_counter() - start)
        return result

    def _note_missed(self, missed: Sequence[str] | None) -> None:
        if self.debt is not None and missed is not None:
            self.debt.note(missed)

    # -- writes ------------------------------------------------------------------------
    def write(self, batch: list[Pending], promote: bool = False) -> None:
        """Write ``batch`` to the tier, unguarded. A promotion (a copy found below) may be
        older than a put or an invalidation made meanwhile: L2 never lets it replace what
        it holds, and L3 takes it only for ids not invalidated in the last fence period."""
        self.tier.put_many(self._frames(batch))

    def takes(self, entry: Pending) -> bool:
        """Does this level hold ``entry``? (L2: not large ones; L4: see ObjectSlot.)"""
        return True

    def store_latest(self, entries: list[Pending]) -> bool:
        """Best effort: write the last value of each id that this level takes."""
        latest = {e.key: e for e in entries}  # an id given twice: its last value wins
        batch = [e for e in latest.values() if self.takes(e)]
        return bool(batch) and self.store(batch) is not UNAVAILABLE

    def store_durably(self, batch: list[Pending]) -> None:
        """Write ``batch`` or raise DurableWriteError: a put is acknowledged only after this."""
        breaker = self.breaker
        if not breaker.allow():
            raise DurableWriteError(
                f"{self.level} is unavailable (circuit open after: {breaker.last_error}); "
                f"{len(batch)} value(s) NOT stored, retry after {self._config.breaker_reset_s}s"
            )
        try:
            self.write(batch)
        except TierUnavailable as exc:
            breaker.failure(exc)
            self.stats.add("errors")
            raise DurableWriteError(f"{exc}; {len(batch)} value(s) NOT stored") from exc
        except StorageError as exc:
            self.stats.add("errors")
            raise DurableWriteError(f"{exc}; {len(batch)} value(s) NOT stored") from exc
        breaker.success()
        self.stats.add_writes(len(batch), sum(len(e.payload.data) for e in batch))

    def remove(self, kernel_id: str) -> bool:
        """Remove ``kernel_id`` for an invalidation; False if the tier could not answer."""
        if self.call(self.tier.delete_many, [kernel_id]) is UNAVAILABLE:
            return False
        self.stats.add("deletes")
        return True

    def cleanup(self) -> Any:
        return self.call(self.tier.cleanup)

    def expires_ms(self) -> int:
        ttl = self.tier.ttl_seconds
        return framing.now_ms() + int(ttl * 1000) if ttl else 0

    def _frames(self, batch: list[Pending]) -> list[tuple[str, bytes]]:
        return [(e.key, framing.pack(e.payload, e.created_ms, self.expires_ms())) for e in batch]


class RedisSlot(TierSlot):
    """L2: shared by every process, so a value it holds must never be older than L3's.

    Writes that miss it (breaker open, timeout) are remembered in ``debt`` and fenced
    before the next call; values above the large-object threshold skip it.
    """

    def __init__(self, tier: RedisTier, config: CacheConfig, debt: L2Debt) -> None:
        super().__init__(tier, config)
        self.debt = debt

    def write(self, batch: list[Pending], promote: bool = False) -> None:
        blobs = self._frames(batch)
        if promote:
            self.tier.add_many(blobs)
        else:
            self.tier.put_many(blobs, announce=True)

    def takes(self, entry: Pending) -> bool:
        return not entry.large

    def _get_one(self) -> Callable:
        return self.tier.get_parts  # header and payload apart: the payload is not copied

    def store_latest(self, entries: list[Pending]) -> bool:
        latest = {e.key: e for e in entries}  # an id given twice: its last value wins
        batch = [e for e in latest.values() if self.takes(e)]
        # A value that skips L2 (large) must not leave an older copy there to be read.
        skipped = [key for key, e in latest.items() if not self.takes(e)]
        if skipped:
            self.call(self.tier.fence_many, skipped, missed=skipped)
        return bool(batch) and self.store(batch) is not UNAVAILABLE

    def remove(self, kernel_id: str) -> bool:
        # A fence, not a delete: a reader that fetched the old value from L3 just
        # before cannot promote it back (see tiers/redis.py).
        if self.call(self.tier.fence_many, [kernel_id], missed=[kernel_id]) is UNAVAILABLE:
            return False
        self.stats.add("deletes")
        return True


class SqlSlot(TierSlot):
    """L3: rows (inline frames, or pointers to L4 for large values) and the change log."""

    def __init__(self, tier: PostgresTier | SqliteTier, config: CacheConfig) -> None:
        super().__init__(tier, config)
        # Change-log rows are kept this long: other processes' L2 debt must outlive L2's TTL.
        self.log_retention_s = max(3600.0, config.l2_ttl_seconds or 7 * 86400.0)

    def write(self, batch: list[Pending], promote: bool = False) -> None:
        rows = [self.row(e) for e in batch]
        if promote:
            self.tier.put_many(rows, fence_s=self._config.invalidation_fence_s)
        else:
            self.tier.put_many(rows)

    def row(self, e: Pending) -> Row:
        """The L3 row for ``e``: its frame inline, or a pointer to its L4 object."""
        inline = not e.large
        blob = framing.pack(e.payload, e.created_ms, self.expires_ms()) if inline else None
        expires = self.expires_ms()
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

    def cleanup(self) -> Any:
        return self.call(self.tier.cleanup, self.log_retention_s)


class ObjectSlot(TierSlot):
    """L4: the only home of large values; of the others only when archiving, or when
    there is no L3 to hold them."""

    def __init__(self, tier: ObjectTier, config: CacheConfig, l3_present: bool) -> None:
        super().__init__(tier, config)
        self._l3_present = l3_present

    def takes(self, entry: Pending) -> bool:
        return entry.large or self._config.archive_to_l4 or not self._l3_present


MAX_REMEMBERED_DROPS = 10_000  # ids whose L1 drop loads in flight are checked against


class TierSlots:
    """L1 and the remote slots of one cache, in waterfall order (``remote``)."""

    def __init__(
        self,
        config: CacheConfig,
        l1: MemoryTier | None,
        l2: RedisSlot | None,
        l3: SqlSlot | None,
        l4: ObjectSlot | None,
    ) -> None:
        self.l1, self.l2, self.l3, self.l4 = l1, l2, l3, l4
        self.remote: list[TierSlot] = [s for s in (l2, l3, l4) if s is not None]
        self._config = config
        # Bumped before every L1 drop; a read that saw it move while it was loading
        # does not leave in L1 what was dropped meanwhile (it may be the value just
        # invalidated). Which ids were dropped, and when, so that an invalidation of one
        # id does not throw away every other load in flight (on a busy cluster, every
        # invalidation anywhere reaches every process).
        self.l1_epoch = 0
        self._dropped_at: dict[str, int] = {}  # id -> epoch of its last drop (bounded)
        self._all_dropped_at = 0  # epoch of the last drop of everything
        self._drops = threading.Lock()

    def slot(self, level: str) -> TierSlot | None:
        return {"l2": self.l2, "l3": self.l3, "l4": self.l4}.get(_level(level))

    def tier(self, level: str) -> Any:
        if _level(level) == "l1":
            return self.l1
        slot = self.slot(level)
        return None if slot is None else slot.tier

    def is_large(self, size: int) -> bool:
        return self.l4 is not None and size > self._config.large_object_threshold

    def durable_for(self, entries: Iterable[Pending]) -> list[TierSlot]:
        """Slots a put must reach before it is acknowledged, objects before pointers."""
        slots: list[TierSlot] = []
        if self.l4 is not None and (self.l3 is None or any(e.large for e in entries)):
            slots.append(self.l4)
        if self.l3 is not None:
            slots.append(self.l3)
        return slots

    # -- L1 and invalidations ------------------------------------------------------------
    def fill_l1(self, found: dict[str, bytes], epoch: int) -> None:
        """Keep what a read loaded in L1, unless an invalidation arrived meanwhile.

        Put first, then look: an invalidation that lands between the two is seen
        here, one that lands after the look drops the fresh copy itself.
        """
        if self.l1 is None or not found:
            return
        self.l1.put_many(found)
        if self.l1_epoch != epoch:
            for key in self._dropped_since(epoch, found):
                self.l1.delete(key)

    def _dropped_since(self, epoch: int, keys: Iterable[str]) -> list[str]:
        with self._drops:
            if self._all_dropped_at > epoch:
                return list(keys)
            dropped = self._dropped_at
            return [key for key in keys if dropped.get(key, -1) > epoch]

    def drop_local(self, kernel_id: str) -> None:
        """Drop ``kernel_id`` from L1, and from every load in flight (recorded first, so
        a load that looks after this sees it; one that looked before is dropped here)."""
        if self.l1 is not None:
            with self._drops:
                self.l1_epoch += 1
                if len(self._dropped_at) >= MAX_REMEMBERED_DROPS:  # then as if all were
                    self._dropped_at.clear()
                    self._all_dropped_at = self.l1_epoch
                self._dropped_at[kernel_id] = self.l1_epoch
            self.l1.delete(kernel_id)

    def drop_all_local(self) -> None:
        if self.l1 is not None:
            with self._drops:
                self.l1_epoch += 1
                self._dropped_at.clear()
                self._all_dropped_at = self.l1_epoch
            self.l1.clear()


def _level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"tier level {level!r} is unknown; use one of {list(LEVELS)}")
    return level


# -- construction ---------------------------------------------------------------------------
def build_slots(
    config: CacheConfig, object_store: ObjectStore | None, wake: threading.Event
) -> TierSlots:
    """The tiers ``config`` asks for, in their slots. ``object_store``, when given, is L4.

    L3 is built last: it applies migrations and may raise. ``wake`` is set whenever a
    write misses L2 (the maintainer then tells the other processes).
    """
    l1 = _build_l1(config)
    l2 = _build_l2(config)
    l4 = _build_l4(config, object_store)
    l3 = _build_l3(config)
    return TierSlots(
        config,
        l1,
        RedisSlot(l2, config, L2Debt(wake, share=l3 is not None)) if l2 is not None else None,
        SqlSlot(l3, config) if l3 is not None else None,
        ObjectSlot(l4, config, l3_present=l3 is not None) if l4 is not None else None,
    )


def _build_l1(c: CacheConfig) -> MemoryTier | None:
    if not c.l1_enabled or c.l1_size_mb <= 0:
        return None
    return MemoryTier(
        int(c.l1_size_mb * (1 << 20)), c.l1_ttl_seconds, c.eviction_policy, c.admission
    )


def _build_l2(c: CacheConfig) -> RedisTier | None:
    if not c.l2_enabled or not c.redis_url:
        return None
    return RedisTier(
        c.redis_url,
        c.redis_prefix,
        c.l2_ttl_seconds,
        c.redis_timeout_s,
        fence_seconds=c.invalidation_fence_s,
        node_retry_s=c.breaker_reset_s,  # a cluster node that failed, as the breaker would
    )


def _build_l3(c: CacheConfig) -> PostgresTier | SqliteTier | None:
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


def _build_l4(c: CacheConfig, store: ObjectStore | None) -> ObjectTier | None:
    if not c.l4_enabled:
        return None
    if store is not None:
        return ObjectTier(store, c.l4_ttl_seconds)
    if c.s3_bucket:
        client = make_s3_client(c.s3_endpoint_url, c.object_store_timeout_s)
        return ObjectTier(S3ObjectStore(client, c.s3_bucket, c.s3_prefix), c.l4_ttl_seconds)
    if c.object_store_path:
        return ObjectTier(
            DirectoryObjectStore(c.object_store_path, durable=False), c.l4_ttl_seconds
        )
    return None
