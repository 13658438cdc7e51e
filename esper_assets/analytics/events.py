"""UsageRecorder: what the cache and the repository served, aggregated in process and
flushed as one Parquet file per window (see ``schema`` for the contract).

Recording is a dict update under a short lock; no I/O happens under it, and nothing
here ever raises into a reader. A daemon thread swaps the aggregation every
``flush_s`` and writes it through ``ObjectStore.put`` (atomic: temporary name and
rename, or S3's PUT). A failed write keeps the rows for the next window.

L1 hits are not recorded one by one (the hit path may pay at most 0.2 us): the cache
hands over the reads it counted per id (:meth:`UsageRecorder.add_reads`), and at flush
time the reads the lower tiers did not answer in the window are the L1 hits.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from esper_assets.analytics import schema
from esper_assets.errors import InvalidInput, StorageError
from esper_assets.storage.objects import ObjectStore

log = logging.getLogger("esper_assets.analytics")

# (source, id, op, tier) -> [requests, bytes, latency_us_sum, latency_timed, histogram]
Key = tuple[str, str, str, str]
REQUESTS, BYTES, LATENCY_SUM, TIMED, HIST = range(5)

# One sequence per process: two recorders (the cache's, the repository's) in one
# process must never write the same <host>-<pid>-<seq> key.
_SEQUENCE = itertools.count()
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9._-]+")


def _new_row() -> list:
    return [0, 0, 0.0, 0, [0] * schema.BUCKETS]


class UsageRecorder:
    """Aggregates usage per (source, id, op, tier) and flushes it every ``flush_s``
    to ``store``; at most ``max_keys`` distinct rows are held (new ones beyond are
    dropped and counted). Thread-safe; ``close()`` flushes what is left."""

    def __init__(
        self,
        store: ObjectStore,
        host: str | None = None,
        flush_s: float = 60,
        max_keys: int = 100_000,
        close_timeout_s: float = 10.0,
    ) -> None:
        if not flush_s > 0:
            raise InvalidInput(f"UsageRecorder flush_s={flush_s!r} must be > 0 seconds")
        if not isinstance(max_keys, int) or max_keys < 1:
            raise InvalidInput(f"UsageRecorder max_keys={max_keys!r} must be an integer >= 1")
        self._store = store
        # The host is a part of an object key: keep it to characters every store takes.
        self.host = _UNSAFE_IN_KEY.sub("_", host or socket.gethostname()) or "host"
        self.flush_s = flush_s
        self.max_keys = max_keys
        self._close_timeout_s = close_timeout_s
        self._lock = threading.Lock()  # guards the aggregation; never held across I/O
        self._flush_lock = threading.Lock()  # one flush at a time
        self._rows: dict[Key, list] = {}
        self._reads: dict[tuple[str, str], dict[str, int]] = {}  # (source, op) -> id -> n
        self._window_start = time.time()
        self._pullers: list[Callable[[], None]] = []
        self._stats = {"files": 0, "rows": 0, "dropped": 0, "failed_flushes": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="esper-usage", daemon=True)
        self._thread.start()

    # -- recording (called by readers: cheap, never raises for a full aggregation) -------
    def record(
        self,
        source: str,
        id: str,
        op: str,
        tier: str,
        nbytes: int,
        latency_us: float | None = None,
        requests: int = 1,
    ) -> None:
        """``requests`` served by ``tier``; ``latency_us`` None when it was not timed
        (``requests=0`` adds a latency sample to requests counted elsewhere)."""
        key = (source, id, op, tier)
        with self._lock:
            row = self._row(self._rows, key, requests)
            if row is None:
                return
            row[REQUESTS] += requests
            row[BYTES] += nbytes
            if latency_us is not None:
                row[LATENCY_SUM] += latency_us
                row[TIMED] += 1
                row[HIST][schema.bucket_of(latency_us)] += 1

    def record_many(self, source: str, op: str, reads: Iterable[tuple[str, str, int]]) -> None:
        """One untimed request per ``(id, tier, nbytes)``, under one lock (a batch read's
        answers: one call instead of one a value)."""
        rows = self._rows
        with self._lock:
            for id, tier, nbytes in reads:
                row = rows.get((source, id, op, tier)) or self._row(rows, (source, id, op, tier), 1)
                if row is not None:
                    row[REQUESTS] += 1
                    row[BYTES] += nbytes

    def add_counts(self, source: str, op: str, tier: str, counts: Mapping[str, int]) -> None:
        """Bulk requests per id, none of them timed (e.g. L1 hits)."""
        with self._lock:
            for id, n in counts.items():
                row = self._row(self._rows, (source, id, op, tier), n)
                if row is not None:
                    row[REQUESTS] += n

    def add_reads(self, source: str, op: str, counts: Mapping[str, int]) -> None:
        """Reads per id answered at any tier; at flush, those the lower tiers did not
        answer in the window become ``l1`` rows of ``op``."""
        with self._lock:
            reads = self._reads.setdefault((source, op), {})
            for id, n in counts.items():
                reads[id] = reads.get(id, 0) + n

    def _row(self, rows: dict[Key, list], key: Key, requests: int) -> list | None:
        """The row of ``key`` in ``rows`` (lock held); None, its ``requests`` counted
        as dropped, when ``rows`` is full."""
        row = rows.get(key)
        if row is None:
            if len(rows) >= self.max_keys:
                self._stats["dropped"] += requests
                return None
            row = rows[key] = _new_row()
        return row

    def pull_before_flush(self, pull: Callable[[], None]) -> None:
        """Call ``pull`` (on the flushing thread) before each flush: the cache hands
        over its read counts there, so a window's L1 hits are counted in it."""
        self._pullers.append(pull)

    def forget_puller(self, pull: Callable[[], None]) -> None:
        if pull in self._pullers:
            self._pullers.remove(pull)

    # -- flushing ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()
        self.flush()  # close(): what is left

    def flush(self) -> bool:
        """Write the window's rows now as one file; False if the store refused them
        (they are kept for the next window). Never raises for a store failure."""
        with self._flush_lock:
            self._pull()
            with self._lock:
                rows, reads = self._rows, self._reads
                self._rows, self._reads = {}, {}
                start, self._window_start = self._window_start, time.time()
                self._add_l1_hits(rows, reads)
            if not rows:
                return True
            try:
                self._write(rows, start, self._window_start)
            except StorageError as exc:
                log.warning(
                    "usage flush failed, keeping %d row(s) for the next: %s", len(rows), exc
                )
                self._keep(rows, start)
                return False
            return True

    def _pull(self) -> None:
        for pull in list(self._pullers):
            try:
                pull()
            except Exception:  # a closed cache, say: its counts are lost, the window is not
                log.exception("usage: handing over read counts failed")

    def _add_l1_hits(self, rows: dict[Key, list], reads: dict) -> None:
        """Reads minus what the lower tiers answered per (source, id) become l1 rows
        (held lock). A read counted in this window whose lower-tier answer lands in
        the next makes that id's l1 count short by one there, never negative."""
        lower: dict[tuple[str, str], int] = {}
        for (source, id, _, tier), row in rows.items():
            if tier != "l1":
                lower[source, id] = lower.get((source, id), 0) + row[REQUESTS]
        for (source, op), counts in reads.items():
            for id, n in counts.items():
                hits = n - lower.pop((source, id), 0)
                if hits > 0 and (row := self._row(rows, (source, id, op, "l1"), hits)):
                    row[REQUESTS] += hits

    def _keep(self, rows: dict[Key, list], start: float) -> None:
        """Merge a failed window's rows into the current one (up to max_keys); the
        window then reaches back to the failed one's start."""
        with self._lock:
            self._stats["failed_flushes"] += 1
            self._window_start = min(self._window_start, start)
            for key, kept in rows.items():
                row = self._row(self._rows, key, kept[REQUESTS])
                if row is not None:
                    row[REQUESTS] += kept[REQUESTS]
                    row[BYTES] += kept[BYTES]
                    row[LATENCY_SUM] += kept[LATENCY_SUM]
                    row[TIMED] += kept[TIMED]
                    row[HIST] = [a + b for a, b in zip(row[HIST], kept[HIST], strict=True)]

    def _write(self, rows: dict[Key, list], start: float, end: float) -> None:
        window_start = datetime.fromtimestamp(start, UTC)
        pid = os.getpid()  # at flush time: a forked child writes under its own pid
        table = events_table(rows, window_start, end - start, self.host, pid)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        key = schema.events_key(window_start, self.host, pid, next(_SEQUENCE))
        self._store.put(key, sink.getvalue().to_pybytes())
        with self._lock:
            self._stats["files"] += 1
            self._stats["rows"] += len(rows)

    # -- observability and lifecycle ------------------------------------------------------
    def stats(self) -> dict[str, int]:
        """Files and rows flushed, requests dropped (a full aggregation, or kept rows
        that no longer fitted), flushes that failed."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Flush what is left and stop the thread (waits at most ``close_timeout_s``)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(self._close_timeout_s)
        if self._thread.is_alive():
            log.warning("usage: the last flush did not finish in %.1f s", self._close_timeout_s)

    def __enter__(self) -> UsageRecorder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def events_table(
    rows: Mapping[Key, list], window_start: datetime, window_s: float, host: str, pid: int
) -> pa.Table:
    """The rows as a table of :data:`schema.EVENT_SCHEMA`."""
    n = len(rows)
    columns: dict[str, list] = {
        "window_start": [window_start] * n,
        "window_s": [window_s] * n,
        "host": [host] * n,
        "pid": [pid] * n,
    }
    for i, name in enumerate(("source", "id", "op", "tier")):
        columns[name] = [key[i] for key in rows]
    for i, name in enumerate(("requests", "bytes", "latency_us_sum", "latency_timed")):
        columns[name] = [row[i] for row in rows.values()]
    columns["latency_hist"] = [row[HIST] for row in rows.values()]
    return pa.Table.from_pydict(columns, schema=schema.EVENT_SCHEMA)
