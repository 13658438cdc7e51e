"""The usage events' Parquet contract: one schema, one hive layout, one histogram.

A usage file holds the *aggregated* use of one process over one flush window: a row
per (source, id, op, tier) with the requests, bytes and a latency histogram. Rows,
not raw events, because the L1 hit path may pay at most 0.2 us: the cache already
counts each read per id (its access counter), so a window's L1 hits cost nothing
more to record; the lower tiers, which take 10-1000 us anyway, add their latency.

Layout (the contract any engine reads as a hive-partitioned dataset)::

    usage/events/date=YYYY-MM-DD/hour=HH/<host>-<pid>-<seq>.parquet

``date`` and ``hour`` are the UTC window start's; they are path columns, not in
the file. Files are zstd-compressed Parquet, written whole (a reader never sees
half a file: the object store writes a temporary name and renames, or S3's PUT).

May import: pyarrow only.
"""

from __future__ import annotations

from datetime import date, datetime

import pyarrow as pa

EVENTS_PREFIX = "usage/events"
DAILY_PREFIX = "usage/daily"  # the rollups: usage/daily/<name>/date=YYYY-MM-DD/<name>.parquet

# Upper bounds (microseconds) of the latency histogram's buckets; the last bucket
# counts everything slower than the last bound.
LATENCY_BOUNDS_US: tuple[float, ...] = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000,
)  # fmt: skip
BUCKETS = len(LATENCY_BOUNDS_US) + 1

SOURCES = ("cache", "repository")
TIERS = ("l1", "l2", "l3", "l4", "miss", "repository")

EVENT_SCHEMA = pa.schema(
    [
        pa.field("window_start", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("window_s", pa.float64(), nullable=False),
        pa.field("host", pa.string(), nullable=False),
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # one of SOURCES
        pa.field("id", pa.string(), nullable=False),  # kernel id or asset id
        pa.field("op", pa.string(), nullable=False),  # get, get_many, put, read, ...
        pa.field("tier", pa.string(), nullable=False),  # one of TIERS: who answered
        pa.field("requests", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("latency_us_sum", pa.float64(), nullable=False),  # of timed requests
        pa.field("latency_timed", pa.int64(), nullable=False),  # requests timed (L1 samples)
        # counts per bucket of LATENCY_BOUNDS_US, BUCKETS long; sums to latency_timed
        pa.field("latency_hist", pa.list_(pa.int64()), nullable=False),
    ]
)


def bucket_of(latency_us: float) -> int:
    """The histogram bucket a latency falls in."""
    for i, bound in enumerate(LATENCY_BOUNDS_US):
        if latency_us <= bound:
            return i
    return BUCKETS - 1


def daily_key(name: str, day: date) -> str:
    """The object key of one day's rollup ``name`` (``events`` is the compacted day)."""
    return f"{DAILY_PREFIX}/{name}/date={day:%Y-%m-%d}/{name}.parquet"


def events_key(window_start: datetime, host: str, pid: int, seq: int) -> str:
    """The object key of one flush's file (``window_start`` is UTC)."""
    return (
        f"{EVENTS_PREFIX}/date={window_start:%Y-%m-%d}/hour={window_start:%H}/"
        f"{host}-{pid}-{seq:06d}.parquet"
    )
