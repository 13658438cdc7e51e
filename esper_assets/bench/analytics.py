"""``esper bench analytics``: the usage rollups over synthetic events, against DuckDB
reading the same Parquet files raw.

Synthetic usage rows (``analytics.schema.EVENT_SCHEMA``: one row is one process's
use of one kernel on one tier over one flush window) are written in the hive layout
to a temporary directory object store: ``rows`` of them on the measured day (10
million full, 1 million ``--quick``), Zipf-distributed over 10,000 kernels, plus a
smaller day for each of the 29 days before it. Then, each timed:

- the cost of recording usage on an L1 hit: ``cache.get`` of a kernel in L1 with a
  ``UsageRecorder`` attached, against the same cache without one, in alternating
  rounds (target <= 0.2 us more per hit);
- compaction of the day's files into one sorted file (MB/s of Parquet read);
- the daily rollup ``kernel_usage_daily`` (target <= 5 s at 10 million rows);
- the top 100 kernels over the 30 days' rollups (target <= 200 ms);
- retirement candidates over the 30 days (no target);

and, as the raw client, DuckDB's own ``read_parquet`` over the same day's files
computing the same per-kernel, per-tier request and byte sums (no percentiles), in
the same run.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from esper_assets.analytics import schema
from esper_assets.bench.timing import paired_medians
from esper_assets.storage.objects import DirectoryObjectStore

KERNELS = 10_000
FILE_ROWS = 500_000  # rows per synthetic file: a busy process's day, in pieces
DAYS = 30
ROLLUP_TARGET_S = 5.0
L1_OVERHEAD_TARGET_US = 0.2
TOP_TARGET_MS = 200.0


def synthetic_rows(n: int, day: date, seed: int) -> pa.Table:
    """``n`` usage rows on ``day``: Zipf over kernels, tiers mostly L1."""
    rng = np.random.default_rng(seed)
    kernel = np.minimum(rng.zipf(1.2, n), KERNELS) - 1
    tiers = np.array(["l1", "l2", "l3", "l4", "miss"])
    tier = tiers[rng.choice(5, n, p=[0.85, 0.08, 0.04, 0.02, 0.01])]
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    window = (start + rng.integers(0, 86_400 // 60, n) * 60) * 1_000_000
    requests = rng.integers(1, 200, n)
    hist = rng.multinomial(1, [1 / schema.BUCKETS] * schema.BUCKETS, size=n) * requests[:, None]
    offsets = np.arange(0, (n + 1) * schema.BUCKETS, schema.BUCKETS, dtype=np.int32)
    columns = {
        "window_start": pa.array(window.astype("int64"), pa.timestamp("us", tz="UTC")),
        "window_s": pa.array(np.full(n, 60.0)),
        "host": pa.array(np.full(n, "bench-host")),
        "pid": pa.array(rng.integers(1000, 1016, n).astype("int32")),
        "source": pa.array(np.full(n, "cache")),
        "id": pa.array(np.char.add("k-", kernel.astype(str))),
        "op": pa.array(np.full(n, "get")),
        "tier": pa.array(tier),
        "requests": pa.array(requests),
        "bytes": pa.array(requests * 4096),
        "latency_us_sum": pa.array(requests * rng.uniform(0.2, 500, n)),
        "latency_timed": pa.array(requests),
        "latency_hist": pa.ListArray.from_arrays(offsets, hist.reshape(-1)),
    }
    return pa.table(columns, schema=schema.EVENT_SCHEMA)


def write_day(store: DirectoryObjectStore, day: date, rows: int, seed: int) -> int:
    """The day's rows as files at the hive layout; the bytes written."""
    written = 0
    stamp = datetime(day.year, day.month, day.day, tzinfo=UTC)
    for seq, start in enumerate(range(0, rows, FILE_ROWS)):
        table = synthetic_rows(min(FILE_ROWS, rows - start), day, seed + seq)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        store.put(schema.events_key(stamp, "bench-host", os.getpid(), seq), data)
        written += len(data)
    return written


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def l1_hit_overhead(root: Path, rounds: int = 41, batch: int = 20_000) -> dict[str, Any]:
    """Microseconds per L1 hit with usage recorded and without, same cache build."""
    from esper_assets.analytics.events import UsageRecorder
    from esper_assets.storage.cache import CacheConfig, PersistentKernelCache

    def cache(name: str) -> PersistentKernelCache:
        config = CacheConfig(sqlite_path=str(root / f"{name}.sqlite3"), l4_enabled=False)
        built = PersistentKernelCache(config)
        built.put("k-hot", b"x" * 4096)
        return built

    plain, recorded = cache("plain"), cache("recorded")
    store = DirectoryObjectStore(root / "usage", durable=False)
    with UsageRecorder(store, flush_s=3600) as recorder:
        recorded.attach_usage(recorder)
        try:
            ours, raw = paired_medians(
                lambda: recorded.get("k-hot"), lambda: plain.get("k-hot"), rounds, batch
            )
        finally:
            plain.close()
            recorded.close()
    overhead = round(ours - raw, 3)
    return {
        "recorded_us": ours,
        "unrecorded_us": raw,
        "overhead_us": overhead,
        "target": f"<= {L1_OVERHEAD_TARGET_US} us",
        "ok": overhead <= L1_OVERHEAD_TARGET_US,
    }


def retirement_s(root: Path, store: DirectoryObjectStore, day: date) -> float:
    """Seconds to list retirement candidates over DAYS days (what it costs is reading
    which ids the usage files name; the repository is empty)."""
    from esper_assets.analytics import rollups
    from esper_assets.storage import AssetRepository

    with AssetRepository(sqlite_path=str(root / "assets.sqlite3"), object_store=store) as repo:
        _, seconds = timed(lambda: rollups.retirement_candidates(store, repo, day, DAYS))
    return seconds


def raw_duckdb_rollup_s(root: Path, day: date) -> float:
    """DuckDB alone over the day's files: requests and bytes per kernel and tier."""
    import duckdb

    glob = str(root / schema.EVENTS_PREFIX / f"date={day:%Y-%m-%d}" / "*" / "*.parquet")
    sql = (
        "SELECT id, tier, sum(requests), sum(bytes) FROM read_parquet(?, hive_partitioning=true) "
        "GROUP BY id, tier"
    )
    with duckdb.connect() as con:
        _, seconds = timed(lambda: con.execute(sql, [glob]).fetchall())
    return seconds


def run(
    quick: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    rows: int | None = None,
) -> dict[str, Any]:
    """The whole bench; ``rows`` overrides the measured day's size (tests)."""
    from esper_assets.analytics import rollups

    short = quick or rows is not None
    rows = rows or (1_000_000 if quick else 10_000_000)
    day = date(2026, 11, 1)
    with TemporaryDirectory(prefix="esper-bench-analytics-") as tmp:
        root = Path(tmp) / "objects"
        store = DirectoryObjectStore(root, durable=False)
        progress("usage recording on the L1 hit path")
        l1 = l1_hit_overhead(Path(tmp), rounds=11 if short else 41)
        progress(f"writing {rows:,} synthetic usage rows for {day}, and 29 smaller days")
        parquet_bytes = write_day(store, day, rows, seed=1)
        for back in range(1, DAYS):
            write_day(store, day - timedelta(days=back), max(1, rows // 100), seed=100 + back)
        progress("compacting the day")
        compacted, compact_s = timed(lambda: rollups.compact_day(store, day))
        progress("the daily rollup")
        _, rollup_s = timed(lambda: rollups.kernel_usage_daily(store, day))
        raw_s = raw_duckdb_rollup_s(root, day)
        for back in range(1, DAYS):
            rollups.kernel_usage_daily(store, day - timedelta(days=back))
        progress("top 100 kernels over 30 days")
        _, top_s = timed(lambda: rollups.cache_warm_list(store, day, top_n=100, lookback_days=DAYS))
        progress("retirement candidates over 30 days")
        retire_s = retirement_s(Path(tmp), store, day)
    return {
        "bench": "analytics",
        "quick": quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
        "parquet_mb": round(parquet_bytes / 2**20, 1),
        "l1_hit_recording": l1,
        "compaction": {
            "seconds": round(compact_s, 3),
            "mb_s": round(parquet_bytes / 2**20 / compact_s, 1),
            "result": str(compacted)[:200],
        },  # fmt: skip
        "rollup": {
            "seconds": round(rollup_s, 3),
            "raw_duckdb_seconds": round(raw_s, 3),
            "vs_raw": round(rollup_s / raw_s, 2),
            "target": f"<= {ROLLUP_TARGET_S} s",
            "ok": rollup_s <= ROLLUP_TARGET_S,
        },  # fmt: skip
        "top_100_30_days": {
            "ms": round(top_s * 1000, 1),
            "target": f"<= {TOP_TARGET_MS} ms",
            "ok": top_s * 1000 <= TOP_TARGET_MS,
        },  # fmt: skip
        "retirement_30_days": {
            "seconds": round(retire_s, 3),
            "note": "the ids the 30 days' usage files name, against an empty repository",
        },
        "raw_baseline": "DuckDB read_parquet over the same day's files: requests and bytes "
        "per kernel and tier (no percentiles), same run",
    }
