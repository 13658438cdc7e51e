"""Timing helpers shared by the benchmarks.

Per-call latency is measured over batches (one clock read per ``batch`` calls,
so the timer's own ~50 ns does not swamp a 1 us operation); the two sides of a
comparison are run in alternating rounds so drift on a busy machine hits both.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass
class Comparison:
    name: str
    ours_us: float | None
    raw_us: float | None
    raw_label: str
    target: str
    ok: bool | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.ours_us is None or not self.raw_us:
            return None
        return round(self.ours_us / self.raw_us, 3)

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def per_call_us(fn: Callable[[], object], batch: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(batch):
        fn()
    return (time.perf_counter_ns() - start) / batch / 1000


def paired_medians(
    ours: Callable[[], object], raw: Callable[[], object], rounds: int, batch: int
) -> tuple[float, float]:
    """Median per-call microseconds of ``ours`` and ``raw``, alternating rounds."""
    # Warm caches, prepared statements and connections, several batches a side. (The
    # 256 KiB "order effect" once blamed on warm-up was the cache's own: an L2 hit
    # held two value-sized buffers and, depending on what ran before, glibc grew and
    # trimmed the heap on every read; see docs/ARCHITECTURE.md, Reads.)
    for _ in range(max(3, rounds // 5)):
        per_call_us(ours, batch)
        per_call_us(raw, batch)
    a, b = [], []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(rounds):
            a.append(per_call_us(ours, batch))
            b.append(per_call_us(raw, batch))
    finally:
        if gc_was_enabled:
            gc.enable()
    return round(statistics.median(a), 3), round(statistics.median(b), 3)


def wall_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` runs."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(samples), 3)
