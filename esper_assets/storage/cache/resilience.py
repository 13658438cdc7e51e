"""Circuit breaker and per-tier statistics.

A dead Redis or object store must cost one bounded timeout, not one per read:
after ``failure_threshold`` consecutive failures the breaker opens and the tier
is skipped; after ``reset_after_s`` one caller is let through as a probe, and
its success closes the breaker again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int = 1,
        reset_after_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.reset_after_s = reset_after_s
        self._clock = clock
        self._lock = threading.Lock()
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self.trips = 0
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        return self._state

    def allow(self) -> bool:
        """May the caller try the tier now? At most one probe while half-open."""
        if self._state == CLOSED:  # fast path without the lock
            return True
        with self._lock:
            if self._state == OPEN and self._clock() - self._opened_at >= self.reset_after_s:
                self._state = HALF_OPEN
                return True
            return False

    def success(self) -> None:
        if self._state == CLOSED and self._failures == 0:
            return
        with self._lock:
            self._state = CLOSED
            self._failures = 0

    def failure(self, error: BaseException | str) -> None:
        with self._lock:
            self.last_error = str(error)
            self._failures += 1
            if self._state == HALF_OPEN or self._failures >= self.failure_threshold:
                if self._state != OPEN:
                    self.trips += 1
                self._state = OPEN
                self._opened_at = self._clock()


class LatencyWindow:
    """The last ``size`` latencies of one tier, for p50/p99 without unbounded memory."""

    def __init__(self, size: int = 4096) -> None:
        self._samples = [0.0] * size
        self._next = 0
        self._count = 0

    def record(self, seconds: float) -> None:
        # Races between threads can drop or overwrite a sample; that is fine for a window.
        i = self._next
        self._samples[i] = seconds
        self._next = (i + 1) % len(self._samples)
        self._count += 1

    def percentiles_us(self) -> dict[str, float | None]:
        n = min(self._count, len(self._samples))
        if n == 0:
            return {"p50_us": None, "p99_us": None}
        ordered = sorted(self._samples[:n])
        return {
            "p50_us": round(ordered[n // 2] * 1e6, 2),
            "p99_us": round(ordered[min(n - 1, (n * 99) // 100)] * 1e6, 2),
        }


class TierStats:
    """Counters for one tier. Increments take a lock: remote calls dwarf its cost."""

    FIELDS = (
        "hits",
        "misses",
        "writes",
        "deletes",
        "errors",
        "corruptions",
        "skipped",
        "bytes_read",
        "bytes_written",
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.FIELDS, 0)
        self.latency = LatencyWindow()

    def add(self, field: str, n: int = 1) -> None:
        with self._lock:
            self.counts[field] += n

    def add_lookup(self, hits: int, misses: int, nbytes: int = 0) -> None:
        with self._lock:
            self.counts["hits"] += hits
            self.counts["misses"] += misses
            self.counts["bytes_read"] += nbytes

    def add_writes(self, n: int, nbytes: int) -> None:
        with self._lock:
            self.counts["writes"] += n
            self.counts["bytes_written"] += nbytes

    def snapshot(self) -> dict[str, int | float | None]:
        with self._lock:
            counts = dict(self.counts)
        return {**counts, **self.latency.percentiles_us()}
