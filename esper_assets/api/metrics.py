"""``GET /metrics``: Prometheus metrics of the cache and repository this worker serves
from, correct when uvicorn runs several worker processes.

How the counts stay right with ``--workers N``: prometheus-client's multiprocess mode.
``esper serve`` gives every worker one ``PROMETHEUS_MULTIPROC_DIR`` (made fresh, removed
when it stops); each worker's metric values live in its own mmapped files there and a
scrape, answered by whichever worker, sums the files of all of them
(``MultiProcessCollector``). The hot path writes none of them: the cache keeps its own
counters (L1 hits are a dict lookup and one integer add), and a :class:`Exporter`
thread in each worker adds their *growth* since its last look to the Prometheus
counters every ``SYNC_S`` seconds, and once more before its worker answers a scrape or
stops. Latency histograms cover the reads below L1 only (10 us and up): a
:class:`UsageTap` between the cache (and repository) and its usage recorder appends
each one to a bounded queue; the exporter thread observes them. Labels are tier names
and operation names: never a URL, id or token.

Without ``PROMETHEUS_MULTIPROC_DIR`` (an app built in-process) the same metrics are
served from this process's default registry.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

SYNC_S = 1.0
MAX_QUEUED = 100_000  # latency samples waiting for the exporter; past it they are dropped
# seconds; the usage files' latency buckets (analytics.schema.LATENCY_BOUNDS_US)
BUCKETS = (1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4,
           1e-3, 2e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0)  # fmt: skip
BREAKER = {"closed": 0, "half_open": 1, "open": 2}
TIER_FIELDS = {  # the cache's per-tier counter -> our counter's name and help
    "hits": ("esper_cache_tier_hits", "Lookups a tier answered with a value."),
    "misses": ("esper_cache_tier_misses", "Lookups a tier answered without a value."),
    "writes": ("esper_cache_tier_writes", "Values written to a tier."),
    "deletes": ("esper_cache_tier_deletes", "Deletes sent to a tier."),
    "errors": ("esper_cache_tier_errors", "Calls to a tier that failed."),
    "corruptions": ("esper_cache_tier_corruptions", "Frames that failed their checks."),
    "skipped": ("esper_cache_tier_skipped", "Calls skipped while the tier's breaker was open."),
    "bytes_read": ("esper_cache_tier_read_bytes", "Bytes read from a tier."),
    "bytes_written": ("esper_cache_tier_written_bytes", "Bytes written to a tier."),
    "evictions": ("esper_cache_tier_evictions", "Entries L1 evicted to make room."),
}
COUNTERS = {name: Counter(name, doc, ["tier"]) for name, doc in TIER_FIELDS.values()}
LOADS = Counter("esper_cache_loads", "Lower-tier loads started by get (single-flight).")
TRIPS = Counter("esper_cache_breaker_trips", "Times a tier's circuit breaker opened.", ["tier"])
BREAKER_STATE = Gauge(
    "esper_cache_breaker_state", "Worst breaker state over the live workers: "
    "0 closed, 1 half open, 2 open.", ["tier"], multiprocess_mode="livemax",
)  # fmt: skip
L1_BYTES = Gauge("esper_cache_l1_bytes", "Bytes in L1, summed over the live workers.",
                 multiprocess_mode="livesum")  # fmt: skip
L1_ENTRIES = Gauge("esper_cache_l1_entries", "Entries in L1, summed over the live workers.",
                   multiprocess_mode="livesum")  # fmt: skip
GET_LATENCY = Histogram(
    "esper_cache_get_latency_seconds", "get() below L1, by the tier that answered "
    "(miss: none did).", ["tier"], buckets=BUCKETS,
)  # fmt: skip
REPO_READS = Counter("esper_repository_reads", "Asset reads by the repository.", ["op"])
REPO_BYTES = Counter("esper_repository_read_bytes", "Bytes the repository read.", ["op"])
REPO_LATENCY = Histogram(
    "esper_repository_read_latency_seconds", "Repository reads.", ["op"], buckets=BUCKETS
)
DROPPED = Counter("esper_metrics_dropped_samples", "Latency samples the exporter never saw.")


def multiprocess_on() -> bool:
    """True when metric values are kept in PROMETHEUS_MULTIPROC_DIR's files (decided by
    prometheus-client when it was imported)."""
    return values.ValueClass is not values.MutexValue


class UsageTap:
    """A usage sink in front of the cache's (or repository's) usage recorder, or of none:
    passes everything on, and queues each timed read below L1 for the exporter."""

    def __init__(self, inner: Any, queue: deque) -> None:
        self.inner, self._queue = inner, queue

    def record(self, source: str, id: str, op: str, tier: str, nbytes: int,
               latency_us: float | None = None, requests: int = 1) -> None:  # fmt: skip
        if tier != "l1" and requests:
            if len(self._queue) < MAX_QUEUED:
                self._queue.append((source, op, tier, nbytes, latency_us))
            else:
                DROPPED.inc()
        if self.inner is not None:
            self.inner.record(source, id, op, tier, nbytes, latency_us, requests)

    def add_reads(self, source: str, op: str, counts: Mapping[str, int]) -> None:
        if self.inner is not None:
            self.inner.add_reads(source, op, counts)

    def pull_before_flush(self, pull: Callable[[], None]) -> None:
        if self.inner is not None:
            self.inner.pull_before_flush(pull)

    def forget_puller(self, pull: Callable[[], None]) -> None:
        if self.inner is not None:
            self.inner.forget_puller(pull)


class Exporter:
    """One per worker: the cache's counters into Prometheus counters (their growth since
    the last look), its gauges as they are, and the queued latency samples."""

    def __init__(self) -> None:
        self.queue: deque = deque()
        self.cache: Any = None
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esper-metrics", daemon=True)

    def tap(self, inner: Any) -> UsageTap:
        return UsageTap(inner, self.queue)

    def start(self, cache: Any) -> None:
        self.cache = cache
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SYNC_S):
            self.sync()

    def stop(self) -> None:
        """Stop the thread, export what is left, and take this worker's gauges out."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self.sync()
        if multiprocess_on():
            multiprocess.mark_process_dead(os.getpid())

    def sync(self) -> None:
        with self._lock:
            if self.cache is not None:
                self._sync_cache(self.cache)
            self._drain()

    def _grow(self, counter: Counter, key: tuple[str, str], now: float, *labels: str) -> None:
        growth = now - self._seen.get(key, 0)
        child = counter.labels(*labels) if labels else counter  # shown from 0 on
        if growth > 0:
            child.inc(growth)
        self._seen[key] = now

    def _sync_cache(self, cache: Any) -> None:
        l1 = cache.tier("l1")
        if l1 is not None:
            stats = l1.stats()
            for field in ("hits", "misses", "evictions"):
                name = TIER_FIELDS[field][0]
                self._grow(COUNTERS[name], (name, "l1"), stats[field], "l1")
            L1_BYTES.set(stats["bytes"])
            L1_ENTRIES.set(stats["entries"])
        for level in cache.tiers:
            slot = cache.slot(level) if level != "l1" else None
            if slot is None:
                continue
            counts = dict(slot.stats.counts)
            for field, (name, _) in TIER_FIELDS.items():
                if field in counts:
                    self._grow(COUNTERS[name], (name, level), counts[field], level)
            self._grow(TRIPS, ("trips", level), slot.breaker.trips, level)
            BREAKER_STATE.labels(level).set(BREAKER.get(slot.breaker.state, 2))
        self._grow(LOADS, ("loads", ""), cache.loads)

    def _drain(self) -> None:
        queue = self.queue
        for _ in range(len(queue)):
            source, op, tier, nbytes, latency_us = queue.popleft()
            if source == "repository":
                REPO_READS.labels(op).inc()
                REPO_BYTES.labels(op).inc(nbytes)
                if latency_us is not None:
                    REPO_LATENCY.labels(op).observe(latency_us / 1e6)
            elif latency_us is not None:
                GET_LATENCY.labels(tier).observe(latency_us / 1e6)


def exposition(exporter: Exporter | None) -> tuple[bytes, str]:
    """The text format of every worker's metrics (this one's brought up to date first)."""
    if exporter is not None:
        exporter.sync()
    if multiprocess_on():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
