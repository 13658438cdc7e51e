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

This module is the façade: the L1 hit path (kept here, it is the hot one), the
public methods, statistics and lifecycle. The work is done by ``slots`` (the
tiers and guarded calls to them), ``reads``, ``writes`` and ``write_back``, and
``maintenance`` (the background thread).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from esper_assets.errors import DurableWriteError, StorageError
from esper_assets.settings import Settings
from esper_assets.storage.cache.config import (
    CacheConfig,
    CacheEntry,
    cache_config_from_settings,
    check_kernel_id,
    is_valid_id,
)
from esper_assets.storage.cache.framing import Codecs
from esper_assets.storage.cache.maintenance import Maintainer
from esper_assets.storage.cache.reads import Reader, UsageSink
from esper_assets.storage.cache.resilience import LatencyWindow
from esper_assets.storage.cache.slots import UNAVAILABLE, TierSlot, build_slots
from esper_assets.storage.cache.tiers.redis import InvalidationListener
from esper_assets.storage.cache.writes import Writer
from esper_assets.storage.objects import ObjectStore

log = logging.getLogger("esper_assets.storage.cache")


class PersistentKernelCache:
    """Multi-tier kernel cache; synchronous and thread-safe."""

    def __init__(
        self,
        config: CacheConfig | None = None,
        object_store: ObjectStore | None = None,
        usage: UsageSink | None = None,
    ) -> None:
        """``object_store``, when given, is L4 (and large-object home) instead of the one
        the config names; Dagster passes the store its S3 resource built. ``usage``: a
        UsageRecorder to tell what was read (see :meth:`attach_usage`)."""
        self.config = config = config or CacheConfig()
        self._codecs = Codecs(
            config.compression if config.enable_compression else "none",
            config.compression_level,
            max_decoded_bytes=config.max_value_bytes,  # a forged frame cannot inflate past it
        )
        wake = threading.Event()  # a write missed L2: the maintainer tells the others now
        self._slots = slots = build_slots(config, object_store, wake)
        self._l1 = slots.l1  # the hot path reads it directly
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="esper-cache")
        self._access: dict[str, int] = {}
        self._access_lock = threading.Lock()  # the maintainer and the usage recorder take counts
        self._access_lent: dict[str, int] = {}  # shown to the recorder, not yet to L3
        self._usage: UsageSink | None = None
        self._writes = Writer(config, self._codecs, slots, self._pool, self._check_open)
        self._write_back = self._writes.write_back
        self._reads = Reader(config, self._codecs, slots, self._write_back)
        self._sample = 0
        self._l1_latency = LatencyWindow()
        self._closed = False
        self._listener = (
            InvalidationListener(slots.l2.tier, slots.drop_local, slots.drop_all_local)
            if slots.l2 is not None and slots.l1 is not None
            else None
        )
        if self._listener is not None:
            # Pub/sub drops messages sent before we subscribe: wait (bounded) so that
            # invalidations published after this constructor returns reach our L1.
            self._listener.wait_subscribed(max(0.5, 4 * config.redis_timeout_s))
        if usage is not None:
            self.attach_usage(usage)
        self._maintainer = Maintainer(
            config, slots, self._write_back, self._take_access_counts, wake
        )
        # from now on: a position to read other processes' changes from
        self._maintainer.read_change_log()
        self._maintainer.start()
        self.startup_warm: Future | None = None
        if config.warm_cache_on_startup and slots.l3 is not None:
            self.startup_warm = self._pool.submit(
                self._warm_from_history, config.warm_startup_count
            )

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> PersistentKernelCache:
        return cls(cache_config_from_settings(Settings.from_env(environ), **overrides))

    @property
    def tiers(self) -> list[str]:
        return (["l1"] if self._l1 is not None else []) + [s.level for s in self._slots.remote]

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
        return self._reads.get(check_kernel_id(kernel_id))

    def _timed_l1_get(self, kernel_id: str) -> bytes | None:
        start = time.perf_counter()
        value = self._l1.get(kernel_id)
        if value is not None:
            seconds = time.perf_counter() - start
            self._l1_latency.record(seconds)
            if self._usage is not None:  # a latency sample; the hit itself is in _access
                self._usage.record("cache", kernel_id, "get", "l1", 0, seconds * 1e6, requests=0)
            return value
        return self._reads.get(check_kernel_id(kernel_id))

    def get_many(self, kernel_ids: Iterable[str]) -> dict[str, bytes]:
        """Values for the ids that exist; one round trip per tier for the rest."""
        ids = list(dict.fromkeys([check_kernel_id(k) for k in kernel_ids]))
        found = self._l1.get_many(ids) if self._l1 is not None else {}
        for kernel_id in ids:
            self._access[kernel_id] = self._access.get(kernel_id, 0) + 1
        missing = [k for k in ids if k not in found]
        return self._reads.get_many(missing, found) if missing else found  # all in L1: done

    def get_entry(self, kernel_id: str) -> CacheEntry | None:
        value = self.get(kernel_id)
        if value is None:
            return None
        l3 = self._slots.l3
        info = l3.call(l3.tier.metadata, kernel_id) if l3 is not None else None
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

    # -- writes -------------------------------------------------------------------
    def put(
        self, kernel_id: str, data: bytes, metadata: Mapping[str, Any] | None = None
    ) -> list[str]:
        """Store ``data``; return the tiers that hold it now.

        Write-through returns once the durable tier has it and raises
        :class:`DurableWriteError` otherwise. Write-back returns once the fast
        tiers have it (see the module docstring for what a crash can lose).
        """
        entry = self._writes.prepare(kernel_id, data, metadata)
        if self.config.write_mode == "write_back":
            return self._writes.put_back(entry)
        return self._writes.put_through([entry])

    def put_many(self, items: Iterable[tuple[str, bytes]] | Mapping[str, bytes]) -> list[str]:
        pairs = items.items() if isinstance(items, Mapping) else items
        entries = [self._writes.prepare(k, v, None) for k, v in pairs]
        if self.config.write_mode == "write_back":
            written: list[str] = []
            for entry in entries:
                written = self._writes.put_back(entry)
            return written
        return self._writes.put_through(entries)

    def flush(self) -> int:
        """Write every dirty key to the durable tier now; raise FlushError if that fails."""
        return self._write_back.flush()

    # -- invalidation, warming, cleanup ------------------------------------------
    def invalidate(self, kernel_id: str) -> None:
        """Remove ``kernel_id`` from every tier and from other processes' L1."""
        check_kernel_id(kernel_id)
        self._write_back.discard(kernel_id)  # waits out a flush that may hold it
        # Durable copies first, then the fast ones: a reader that misses L2 after this
        # finds nothing below, and one that read L3 before is fenced (L2, L1).
        slots = self._slots
        l3_failed = slots.l3 is not None and not slots.l3.remove(kernel_id)
        if slots.l4 is not None:
            slots.l4.remove(kernel_id)
        slots.drop_local(kernel_id)
        if slots.l2 is not None:
            slots.l2.remove(kernel_id)
        if l3_failed:
            raise DurableWriteError(
                f"invalidate({kernel_id!r}): L3 could not delete it ({slots.l3.breaker.last_error}); "
                "it may come back after this process's L1 forgets it - retry"
            )

    def clear_l1(self) -> None:
        """Forget this process's L1, as a fresh process starts (the other tiers keep it all)."""
        self._slots.drop_all_local()

    def warm_cache(self, kernel_ids: Iterable[str]) -> dict[str, str]:
        """Load ids into the fast tiers, in the order given (highest priority first).

        Returns per id: ``"l1"`` (already hot), the tier it was loaded from, or ``"missing"``.
        """
        return self._reads.warm(kernel_ids)

    def _warm_from_history(self, n: int) -> dict[str, str]:
        l3 = self._slots.l3
        ids = l3.call(l3.tier.hottest, n)
        return {} if ids is UNAVAILABLE else self.warm_cache(ids)

    def hottest(self, n: int = 100) -> list[str]:
        """The most accessed kernel ids (access counts are flushed to L3 periodically)."""
        self._maintainer.flush_access_counts()
        l3 = self._slots.l3
        ids = l3.call(l3.tier.hottest, n) if l3 is not None else UNAVAILABLE
        return [] if ids is UNAVAILABLE else ids

    def cleanup(self) -> dict[str, int]:
        """Remove expired entries from every tier; return how many per tier."""
        slots = self._slots
        removed = {"l1": self._l1.cleanup() if self._l1 is not None else 0}
        for slot in slots.remote:
            gone = slot.cleanup()
            if gone is UNAVAILABLE:
                removed[slot.level] = -1
                continue
            removed[slot.level] = len(gone)
            if slot is slots.l3 and slots.l4 is not None:
                orphans = [key for key, object_key in gone if object_key]
                if orphans:
                    slots.l4.call(slots.l4.tier.delete_many, orphans)
        return removed

    # -- usage ------------------------------------------------------------------------
    def attach_usage(self, usage: UsageSink) -> None:
        """Tell ``usage`` (a UsageRecorder) what is read: the reads below L1 as they
        happen, and before each of its flushes the reads counted per id (the L1 hit
        path stays as it is: the recorder derives the hits from those counts)."""
        self._usage = usage
        self._reads.usage = usage
        usage.pull_before_flush(self._lend_access_counts)

    def _swap_access_counts(self) -> dict[str, int]:
        """The reads counted since the last swap (lock held); the recorder sees each once."""
        counts, self._access = self._access, {}
        if self._usage is not None and counts:
            # get() counts before it checks the id: keep the bad ones out of the files.
            self._usage.add_reads(
                "cache", "get", {k: n for k, n in counts.items() if is_valid_id(k)}
            )
        return counts

    def _lend_access_counts(self) -> None:
        """The recorder's turn: it sees the counts now; L3 gets them on the next take."""
        with self._access_lock:
            lent = self._access_lent
            for kernel_id, n in self._swap_access_counts().items():
                lent[kernel_id] = lent.get(kernel_id, 0) + n

    def _take_access_counts(self) -> dict[str, int]:
        with self._access_lock:
            counts, self._access_lent = self._access_lent, {}
            for kernel_id, n in self._swap_access_counts().items():
                counts[kernel_id] = counts.get(kernel_id, 0) + n
        return counts

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
        for slot in self._slots.remote:
            stats = slot.stats.snapshot()
            stats["breaker"] = slot.breaker.state
            if include_sizes:
                size = slot.call(slot.tier.size)
                stats.update(
                    size if isinstance(size, dict) else {"entries": None, "stored_bytes": None}
                )
            tiers[slot.level] = stats
        reads = self._reads
        requests = l1_hits + reads.requests
        hits = requests - reads.not_found
        return {
            "tiers": tiers,
            "requests": requests,
            "hits": hits,
            "misses": reads.not_found,
            "overall_hit_rate": round(hits / requests, 4) if requests else None,
            "loads": reads.loads,
            "write_mode": self.config.write_mode,
            "write_back": self._write_back.stats(),
        }

    def health(self) -> dict[str, dict[str, Any]]:
        report: dict[str, dict[str, Any]] = {}
        if self._l1 is not None:
            report["l1"] = {
                "status": "healthy",
                "usage_percent": round(100 * self._l1.used_bytes / self._l1.max_bytes, 1),
            }
        for slot in self._slots.remote:
            start = time.perf_counter()
            try:
                slot.tier.ping()
                report[slot.level] = {
                    "status": "healthy",
                    "latency_ms": round((time.perf_counter() - start) * 1e3, 2),
                }
            except StorageError as exc:
                report[slot.level] = {"status": "unavailable", "error": str(exc)}
            report[slot.level]["breaker"] = slot.breaker.state
        return report

    @property
    def loads(self) -> int:
        """Lower-tier loads started by get(): single-flight keeps this low."""
        return self._reads.loads

    # -- seams: a look inside, for operators and tests --------------------------------
    def tier(self, level: str) -> Any:
        """The tier object at ``level`` ("l1".."l4"), or None where it is not configured."""
        return self._slots.tier(level)

    def slot(self, level: str) -> TierSlot | None:
        """The slot of remote tier ``level`` ("l2".."l4": tier, breaker, stats), or None."""
        return self._slots.slot(level)

    def breaker_states(self) -> dict[str, str]:
        """Each remote tier's circuit breaker: "closed", "open" or "half_open"."""
        return {slot.level: slot.breaker.state for slot in self._slots.remote}

    @property
    def codecs(self) -> Codecs:
        """The codecs values are encoded with: ``codecs.decode(framing.unpack(blob))``."""
        return self._codecs

    def pending_writes(self) -> dict[str, bytes]:
        """Write-back: the values put but not yet flushed to the durable tiers."""
        return self._write_back.pending()

    def discard_pending_writes(self) -> int:
        """Write-back: forget the values not yet flushed, without storing them (for a
        durable tier that will never take them); return how many were dropped."""
        return self._write_back.discard_all()

    @property
    def maintainer(self) -> Maintainer:
        """The background upkeep (``stop()``, ``running``, ``run_once()``)."""
        return self._maintainer

    def maintain_now(self) -> None:
        """Do the background thread's work once, now, in this thread (see maintenance)."""
        self._maintainer.run_once()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until other processes' invalidations reach this L1 over Redis pub/sub;
        False after ``timeout``, or at once if there is no listener (no L1 or no L2)."""
        return self._listener is not None and self._listener.wait_subscribed(timeout)

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Flush write-back and access counts, then release connections.

        Raises FlushError (and stays open, so you can retry) if dirty keys cannot be persisted.
        """
        if self._closed:
            return
        if self.config.write_mode == "write_back":
            self.flush()
        maintainer = self._maintainer
        maintainer.stop()
        maintainer.flush_access_counts()
        maintainer.share_l2_debt()
        if maintainer.unshared_l2_debt:
            log.warning(
                "closing with %d id(s) whose Redis copy may be stale and that L3 could not "
                "record; other processes may read them from L2 until their TTL",
                maintainer.unshared_l2_debt,
            )
        self._closed = True
        if self._usage is not None:
            self._usage.forget_puller(self._lend_access_counts)
        if self._listener is not None:
            self._listener.close()
        self._pool.shutdown(wait=True)
        for slot in self._slots.remote:
            slot.tier.close()

    def __enter__(self) -> PersistentKernelCache:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
