"""``GET /metrics``: Prometheus metrics of the cache and repository this worker serves
from, correct when uvicorn runs several worker processes.

How the counts stay right with ``--workers N``: prometheus-client's multiprocess mode.
``esper serve`` gives every worker one ``PROMETHEUS_MULTIPROC_DIR`` (made fresh, removed
when it stops); each worker's metric values live in its own mmapped files there and a
scrape, answered by whichever worker, sums the files of all of them
(``MultiProcessCollector``). The hot path writes none of them: the cache keeps its own
counters (L1 hits are a dict lookup and one integer add), and a :class:`Exporter`
thread in each worker adds their *growth* since its last look to the Prometheus
counters every ``SYNC_S`` seconds, once when the worker starts (before it answers
anything: every series it writes is shown from 0, and its files are made then, not at
some later sync), and once more before its worker answers a scrape or stops. Latency histograms cover the reads below L1 only (10 us and up): a
:class:`UsageTap` between the cache (and repository) and its usage recorder appends
each one to a bounded queue; the exporter thread observes them. Labels are tier names
and operation names: never a URL, id or token.

Work done in *other* processes (Dagster runs and sensors, ``esper ingest``) never
touches a counter of ours, so :class:`Records` derives it at scrape time from the durable
records every process writes, and caches the answer for ``RECORDS_TTL_S``: repository
writes from the audit trail (read incrementally), kernel compile times from the kernel
rows (buckets summed in SQL), and the landing zone's backlog (``flows.arrivals
.BacklogWatch``). Every worker reads the same records, so whichever answers a scrape gives
the same totals; they are not written to the multiprocess files. A source that cannot be
read leaves its metrics out of that scrape and counts an error; the rest still answer.

Without ``PROMETHEUS_MULTIPROC_DIR`` (an app built in-process) the same metrics are
served from this process's default registry.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
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
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from esper_assets.errors import EsperError
from esper_assets.flows import wiring
from esper_assets.flows.arrivals import Backlog, BacklogWatch
from esper_assets.flows.landing import BLUEPRINTS, LandingZone
from esper_assets.settings import Settings
from esper_assets.storage import AssetRepository

log = logging.getLogger(__name__)

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
COLLECT_ERRORS = Counter(
    "esper_metrics_collect_errors", "Looks at the durable records (source: repository or "
    "landing) that failed; their metrics are left out of that scrape.", ["source"],
)  # fmt: skip
# A scrape this soon after the last look at the records reuses it. Kept below any scrape
# interval, so each scrape of a Prometheus sees records no older than its last one did,
# whichever worker answers: a counter never seems to go back.
RECORDS_TTL_S = 2.0
# The landing zone's listing costs ~7 ms per 1,000 files: looked at apart from the scrapes
# (see Cached), every few seconds while scraped; the lag itself is computed at each scrape.
LANDING_TTL_S = 5.0
RECORDS_RETRY_S = 15.0  # after a failed look: a database that is down costs a timeout rarely
# The audit trail's events (repository writes); any other name is exported as "other".
OPERATIONS = ("created", "duplicate", "new_version", "updated", "deprecated", "archived")
COMPILE_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0)


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

    def record_many(self, source: str, op: str, reads: Iterable[tuple[str, str, int]]) -> None:
        """A cache's batch read: passed on only. Untimed, its reads feed no histogram,
        and the per-tier counters come from the cache's own stats (see Exporter)."""
        if self.inner is not None:
            self.inner.record_many(source, op, reads)

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
        self.records: Records | None = None
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esper-metrics", daemon=True)

    def tap(self, inner: Any) -> UsageTap:
        return UsageTap(inner, self.queue)

    def start(
        self, cache: Any, repo: AssetRepository | None = None, settings: Settings | None = None
    ) -> None:
        """Export ``cache``'s counters from now on; with ``repo`` and ``settings``, the
        work of other processes too (see :class:`Records`)."""
        self.cache = cache
        if repo is not None and settings is not None:
            self.records = Records(repo, lambda: visible_landing(settings))
        self._first_series(cache, repo)
        self.sync()  # before the worker answers: every file it writes exists from now on
        self._thread.start()

    def _first_series(self, cache: Any, repo: AssetRepository | None) -> None:
        """Every labelled series this worker can write, at 0: shown from the first
        scrape on, and each multiprocess file (an open file and its mmap, two fds) made
        now, not at an unforeseeable later sync (the worker's fd count settles here)."""
        for tier in (*(t for t in cache.tiers if t != "l1"), "miss"):
            GET_LATENCY.labels(tier)
        if repo is not None:
            for metric in (REPO_READS, REPO_BYTES, REPO_LATENCY):
                metric.labels("read")  # the repository's one timed read (get_asset)
        if self.records is not None:
            for source in ("repository", "landing"):
                COLLECT_ERRORS.labels(source)

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


class Cached:
    """The last answer of ``fetch`` (one source's records), asked again once it is older
    than ``ttl_s`` (RECORDS_RETRY_S after a failure). A failure is counted, logged when
    the source goes from readable to not, and answered with None.

    ``background``: after the first look (made by the scrape that needs it), a stale
    answer is served while a thread looks again, so a scrape never waits for the look;
    for gauges only (a counter served stale by one worker could look lower than what
    another answered before)."""

    def __init__(
        self, source: str, fetch: Callable[[], Any], ttl_s: float, background: bool = False
    ) -> None:
        self.source, self._fetch, self._ttl_s, self._background = source, fetch, ttl_s, background
        self._value: Any = None
        self._failed = False
        self._looked = self._looking = False
        self._next_look = 0.0
        self._lock = threading.Lock()  # concurrent scrapes in one worker: one look

    def value(self) -> Any:
        with self._lock:
            if time.monotonic() >= self._next_look and not self._looking:
                if self._background and self._looked:
                    self._looking = True
                    threading.Thread(target=self._look_apart, name="esper-metrics-records",
                                     daemon=True).start()  # fmt: skip
                else:
                    self._keep(*self._look())
            return self._value

    def _look_apart(self) -> None:
        found = self._look()
        with self._lock:
            self._keep(*found)
            self._looking = False

    def _look(self) -> tuple[Any, str]:
        try:
            return self._fetch(), ""
        except Exception as exc:  # a scrape never fails for a source; the others still answer
            COLLECT_ERRORS.labels(self.source).inc()
            # EsperError messages carry redacted locations only; a foreign one, its type
            return None, str(exc) if isinstance(exc, EsperError) else type(exc).__name__

    def _keep(self, value: Any, failure: str) -> None:
        if failure and not self._failed:
            log.warning("/metrics: cannot read the %s's records; its metrics are left out "
                        "until it answers again: %s", self.source, failure)  # fmt: skip
        self._value, self._failed, self._looked = value, bool(failure), True
        self._next_look = time.monotonic() + (RECORDS_RETRY_S if failure else self._ttl_s)


class OperationTotals:
    """Running totals of the audit trail's events by operation, each look reading only
    the events after the last settled one (see AssetRepository.count_events)."""

    def __init__(self) -> None:
        self._through = 0
        self._settled: Tally[str] = Tally()

    def totals(self, repo: AssetRepository) -> dict[str, int]:
        found = repo.count_events(self._through)
        self._settled.update(_operations(found.settled))
        self._through = found.through
        totals = dict.fromkeys(OPERATIONS, 0)  # every operation shown from 0 on
        totals.update(self._settled + _operations(found.recent))
        return totals


def _operations(counts: Mapping[str, int]) -> Tally[str]:
    """Counts by event, named by operation (an event we do not know of is "other")."""
    named: Tally[str] = Tally()
    for event, n in counts.items():
        named[event if event in OPERATIONS else "other"] += n
    return named


def visible_landing(settings: Settings) -> LandingZone | None:
    """The landing zone, or None when a directory one has no ``blueprints/`` here (a
    service on another machine than the runs): reporting it empty would be a lie, and
    building it would create it."""
    if (
        not settings.landing.startswith("s3://")
        and not (Path(settings.landing) / BLUEPRINTS).is_dir()
    ):
        return None
    return wiring.landing_zone(settings)


class Records:
    """A collector of the metrics of work done in other processes, derived from what
    they durably record: repository writes (the audit trail), kernel compile times (the
    kernel rows) and the landing zone's backlog (files without a kernel yet)."""

    def __init__(self, repo: AssetRepository, open_landing: Callable[[], LandingZone | None]):
        self._repo = repo
        self._open_landing = open_landing
        self._landing: LandingZone | None = None
        self._operations = OperationTotals()
        self._backlog = BacklogWatch()
        self._sources = [
            Cached("repository", self._repository, RECORDS_TTL_S),
            Cached("landing", self._landing_backlog, LANDING_TTL_S, background=True),
        ]

    def _repository(self) -> tuple[dict[str, int], tuple[int, float, list[int]]]:
        bounds_ms = [b * 1e3 for b in COMPILE_BUCKETS_S]
        return self._operations.totals(self._repo), self._repo.compile_times(bounds_ms)

    def _landing_backlog(self) -> Backlog | None:
        if self._landing is None:
            self._landing = self._open_landing()
            if self._landing is None:
                return None
        return self._backlog.look(self._landing, self._repo)

    def collect(self) -> Iterator[Metric]:
        repository, landing = (source.value() for source in self._sources)
        up = GaugeMetricFamily(
            "esper_metrics_source_up", "1 when the last look at a source's records "
            "(repository, landing) answered.", labels=["source"],
        )  # fmt: skip
        up.add_metric(["repository"], float(repository is not None))
        up.add_metric(["landing"], float(landing is not None))
        yield up
        if repository is not None:
            yield from repository_families(*repository)
        if landing is not None:
            yield from landing_families(landing, time.time())


def repository_families(
    operations: Mapping[str, int], compiles: tuple[int, float, list[int]]
) -> Iterator[Metric]:
    ops = CounterMetricFamily(
        "esper_repository_operations", "Repository writes by every process, from the audit "
        "trail (created: one per create call or bulk batch; duplicate: content already "
        "stored).", labels=["op"],
    )  # fmt: skip
    for op, n in sorted(operations.items()):
        ops.add_metric([op], n)
    yield ops
    count, total_ms, within = compiles
    buckets = [(str(b), n) for b, n in zip(COMPILE_BUCKETS_S, within, strict=True)]
    yield HistogramMetricFamily(
        "esper_pipeline_compile_seconds", "How long each registered kernel took to "
        "compile (its compilation_time_ms), wherever it was compiled.",
        buckets=[*buckets, ("+Inf", count)], sum_value=total_ms / 1e3,
    )  # fmt: skip


def landing_families(backlog: Backlog, now: float) -> Iterator[Metric]:
    lag = 0.0 if backlog.oldest_ns is None else max(0.0, now - backlog.oldest_ns / 1e9)
    yield GaugeMetricFamily(
        "esper_pipeline_landing_lag_seconds", "Age of the oldest blueprint file in the "
        "landing zone that no kernel was built from yet (0 when none): how far the "
        "new_blueprints sensor and its runs are behind.", value=lag,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "esper_pipeline_landing_pending_files", "Blueprint files in the landing zone that "
        "no kernel was built from yet.", value=backlog.pending,
    )  # fmt: skip
    yield GaugeMetricFamily(
        "esper_pipeline_landing_invalid_files", "Files in the landing zone that cannot "
        "become a kernel as they are (bad name or content); not in the lag.",
        value=backlog.invalid,
    )  # fmt: skip


def exposition(exporter: Exporter | None) -> tuple[bytes, str]:
    """The text format of every worker's metrics (this one's brought up to date first),
    and the metrics derived from the records (looked at first: a failed look's error
    count is in the same answer)."""
    registry = CollectorRegistry()
    if exporter is not None:
        exporter.sync()
        if exporter.records is not None:
            registry.register(exporter.records)
    if multiprocess_on():
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(REGISTRY)  # a registry is a collector too
    return generate_latest(registry), CONTENT_TYPE_LATEST
