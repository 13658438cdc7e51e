"""The daily rollups the Dagster assets materialize: each reads a day's usage files
(``dataset.read_events``), runs one SQL file of ``sql/analytics/`` with an
``AnalyticsSession`` and writes the answer as one zstd Parquet file through the object
store, at ``usage/daily/<name>/date=YYYY-MM-DD/<name>.parquet``. Re-running a day
writes the same key again, so a backfill replaces, never duplicates. Each file says in
its Parquet key-value metadata (``esper.read``) what it was made from: usage rows,
files, bytes, the damaged files skipped and how many files its day had.

- ``compact_day``: the day's small files as one file, sorted by (id, tier, window_start).
- ``kernel_usage_daily``: per kernel and tier: requests, hit rate, bytes, p50/p95/p99.
- ``cache_warm_list``: the top kernels by exponentially decayed requests, summed from
  each day's ``kernel_usage`` file (a day without one is rolled up in memory).
- ``retirement_candidates``: idle kernels and blueprints (deprecated when ``apply``).
- ``asset_inventory``: the repository's counts and bytes by type and state.

May import: ``esper_assets.errors``, ``storage``, ``analytics``. Never Dagster.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esper_assets.analytics.dataset import (
    PROVENANCE_KEY,
    READ_SCHEMA,
    READERS,
    DamagedFile,
    EventsRead,
    Provenance,
    hive_partition,
    list_parquet,
    read_events,
    read_parquet_object,
    used_ids,
)
from esper_assets.analytics.query import AnalyticsSession
from esper_assets.analytics.schema import (
    BUCKETS,
    DAILY_PREFIX,
    EVENT_SCHEMA,
    LATENCY_BOUNDS_US,
    daily_key,
)
from esper_assets.errors import InvalidInput
from esper_assets.storage import AssetRepository
from esper_assets.storage.objects import ObjectStore
from esper_assets.storage.repository import AssetQuery

PIECE = 1 << 20  # rows taken and encoded at a time by compaction (one row group each)
ACTOR = "esper-analytics"  # who the audit log says deprecated an idle asset
PAGE = 10_000  # AssetQuery's largest limit
NO_EVENTS = EventsRead(READ_SCHEMA.empty_table(), 0, 0, [])  # what the inventory reads

# What each rollup's file holds; the assets' schema checks compare the file with these.
KERNEL_USAGE_SCHEMA = pa.schema([
    pa.field("kernel_id", pa.string(), nullable=False),
    pa.field("tier", pa.string(), nullable=False),
    pa.field("requests", pa.int64(), nullable=False),
    pa.field("hit_rate", pa.float64()),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("p50_us", pa.float64()),
    pa.field("p95_us", pa.float64()),
    pa.field("p99_us", pa.float64()),
])  # fmt: skip
WARM_LIST_SCHEMA = pa.schema([
    pa.field("rank", pa.int64(), nullable=False),
    pa.field("kernel_id", pa.string(), nullable=False),
    pa.field("score", pa.float64(), nullable=False),
    pa.field("requests", pa.int64(), nullable=False),
    pa.field("last_used", pa.date32(), nullable=False),
])  # fmt: skip
RETIREMENT_SCHEMA = pa.schema([
    pa.field("asset_id", pa.string(), nullable=False),
    pa.field("asset_type", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("version", pa.string(), nullable=False),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("deprecated", pa.bool_(), nullable=False),
])  # fmt: skip
INVENTORY_SCHEMA = pa.schema([
    pa.field("asset_type", pa.string(), nullable=False),
    pa.field("state", pa.string(), nullable=False),
    pa.field("assets", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("expired", pa.int64(), nullable=False),
])  # fmt: skip
OUTPUT_SCHEMAS = {
    "events": EVENT_SCHEMA,
    "kernel_usage": KERNEL_USAGE_SCHEMA,
    "warm_list": WARM_LIST_SCHEMA,
    "retirement_candidates": RETIREMENT_SCHEMA,
    "inventory": INVENTORY_SCHEMA,
}

# The repository's rows as the retirement and inventory SQL see them.
REPO_ASSETS_SCHEMA = pa.schema([
    ("asset_id", pa.string()), ("asset_type", pa.string()), ("name", pa.string()),
    ("version", pa.string()), ("state", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")), ("size_bytes", pa.int64()),
    ("derived_from", pa.list_(pa.string())), ("expired", pa.bool_()),
])  # fmt: skip


class Rollup(NamedTuple):
    """What one rollup wrote, and what it read to write it."""

    key: str  # the object written
    rows: int  # rows written
    table: pa.Table | None  # its contents (OUTPUT_SCHEMAS[name]); None for compaction
    events: int  # usage rows read (0 for the inventory)
    files: int  # usage files read
    bytes_in: int  # their stored size
    bytes_out: int  # the written file's size
    skipped: list[tuple[str, str]]  # (key, reason) of usage files that could not be read
    day_files: int  # the usage files of ``day`` itself it saw (read or skipped)


# -- the rollups ------------------------------------------------------------------------
def compact_day(store: ObjectStore, day: date) -> Rollup:
    """The day's usage files as one file, sorted by (id, tier, window_start)."""
    read = read_events(store, _day(day))
    rows = read.table.drop_columns(["date", "hour"])  # the daily file's path holds the date
    numbered = rows.append_column("row", pa.array(np.arange(rows.num_rows, dtype=np.int64)))
    # DuckDB orders the row numbers only: sorting the rows themselves moved every
    # histogram list through its sort, 3x slower than this order and a take.
    order = _run_on_events("compact_order", store, read._replace(table=numbered))
    pieces = _taken_in_pieces(rows, order.column("row"))
    return _put(store, "events", day, pieces, Provenance.of(read), rows.num_rows)


def kernel_usage_daily(store: ObjectStore, day: date) -> Rollup:
    """Per kernel and tier: requests, hit rate, bytes and p50/p95/p99 latency (us)."""
    read = read_events(store, _day(day))
    return _write(store, "kernel_usage", day, _kernel_usage(store, read), Provenance.of(read))


def cache_warm_list(
    store: ObjectStore, day: date, top_n: int = 100, half_life_days: float = 7,
    lookback_days: int = 30,
) -> Rollup:  # fmt: skip
    """The ``top_n`` kernels by cache reads over ``lookback_days`` days to ``day``, each
    day's weighed by 0.5 ** (its age in days / ``half_life_days``).

    Each day's reads come from its ``kernel_usage`` file: a few rows per kernel, where
    its usage files hold a row per process and flush window (30 days of those took 6 s
    at 10 million rows a day; the rollups take 0.1 s). A day without one is rolled up
    in memory from its files."""
    _count("top_n", top_n)
    _count("lookback_days", lookback_days)
    if not _is_number(half_life_days) or not half_life_days > 0:
        raise InvalidInput(f"half_life_days must be a number of days > 0, not {half_life_days!r}")
    days = [_day(day) - timedelta(days=back) for back in range(lookback_days)]
    written = {key for key, _ in list_parquet(store, f"{DAILY_PREFIX}/kernel_usage")}
    with ThreadPoolExecutor(READERS, thread_name_prefix="usage-days") as pool:
        usage = list(pool.map(lambda d: kernel_usage_of(store, d, written), days))
    usage_days = pa.concat_tables([
        table.append_column("day", pa.array([d] * table.num_rows, pa.date32()))
        for d, (table, _) in zip(days, usage, strict=True)
    ])  # fmt: skip
    params = {"day": day, "top_n": top_n, "half_life_days": float(half_life_days),
              "lookback_days": lookback_days}  # fmt: skip
    with AnalyticsSession(store, standard_views=False) as session:
        session.register("usage_days", usage_days)
        session.register("params", _one_row(params))
        table = session.query(sql_text("warm_list"))
    read = Provenance.merged([p for _, p in usage], day_files=usage[0][1].day_files)
    return _write(store, "warm_list", day, table, read)


def kernel_usage_of(
    store: ObjectStore, day: date, written: set[str] | None = None
) -> tuple[pa.Table, Provenance]:
    """``day``'s kernel usage and what it was made from: its ``kernel_usage`` file when
    one was written (``written``: the keys there, when the caller listed them), else
    rolled up from the day's usage files (not written: that is the
    ``kernel_usage_daily`` partition's job). A damaged file is named in ``skipped`` and
    the day rolled up from its files."""
    key = daily_key("kernel_usage", day)
    problem: list[tuple[str, str]] = []
    if written is None or key in written:
        try:
            table = read_parquet_object(store, key)
            found = Provenance.from_file(table)
            if found is not None:
                return table.replace_schema_metadata().cast(KERNEL_USAGE_SCHEMA), found
            problem.append((key, "has no esper.read metadata: rolled up again from the day"))
        except (DamagedFile, pa.ArrowInvalid) as exc:
            if written is not None:  # listed, so it was there: say what was wrong
                problem.append((key, f"{exc}: rolled up again from the day"))
    read = read_events(store, day)
    made = Provenance.of(read)
    return _kernel_usage(store, read), made._replace(skipped=problem + made.skipped)


def _kernel_usage(store: ObjectStore, read: EventsRead) -> pa.Table:
    table = _run_on_events("kernel_usage", store, read, latency_bounds=_latency_bounds())
    return table.cast(KERNEL_USAGE_SCHEMA)


def retirement_candidates(
    store: ObjectStore, repo: AssetRepository, day: date, unused_days: int = 30,
    apply: bool = False,
) -> Rollup:  # fmt: skip
    """Active kernels and blueprints no usage row named in the ``unused_days`` days to
    ``day`` (and older than that), except a kernel a live checkpoint names and a
    blueprint a kernel that stays compiled from; with ``apply`` each is deprecated
    through the repository's lifecycle API, the reason landing in its audit log."""
    _count("unused_days", unused_days)
    days = [_day(day) - timedelta(days=back) for back in range(unused_days)]
    with ThreadPoolExecutor(READERS, thread_name_prefix="usage-days") as pool:
        reads = list(pool.map(lambda d: used_ids(store, d), days))
    used = pa.concat_tables([r.table for r in reads])
    window_start = datetime.combine(days[-1], time(), UTC)
    with AnalyticsSession(store, standard_views=False) as session:
        for name, table in {
            "used_ids": used,
            "params": _one_row({"cutoff": window_start}),
            "repo_assets": _repo_assets(repo, AssetQuery().with_type("kernel", "blueprint")),
            "checkpoint_kernels": _checkpoint_kernels(repo),
        }.items():
            session.register(name, table)
        found = session.query(sql_text("retirement_candidates"))
    reason = f"no use in the {unused_days} days to {day:%Y-%m-%d} (usage analytics)"
    for asset_id in found.column("asset_id").to_pylist() if apply else []:
        repo.deprecate_asset(asset_id, reason, actor=ACTOR)
    found = found.append_column("reason", pa.array([reason] * found.num_rows, pa.string()))
    found = found.append_column("deprecated", pa.array([apply] * found.num_rows, pa.bool_()))
    read = Provenance(
        events=pc.sum(used.column("rows")).as_py() or 0,
        files=sum(r.files for r in reads),
        bytes_in=sum(r.bytes for r in reads),
        skipped=[s for r in reads for s in r.skipped],
        day_files=reads[0].files + len(reads[0].skipped),
    )
    return _write(store, "retirement_candidates", day, found, read)


def asset_inventory(store: ObjectStore, repo: AssetRepository, day: date) -> Rollup:
    """What the repository holds now, by asset type and state (count, bytes, expired),
    filed under ``day``."""
    assets = _repo_assets(repo, AssetQuery().include_expired())
    with AnalyticsSession(store, standard_views=False) as session:
        session.register("repo_assets", assets)
        table = session.query(sql_text("inventory"))
    return _write(store, "inventory", _day(day), table, Provenance.of(NO_EVENTS))


def latest_warm_list(store: ObjectStore, n: int) -> tuple[str, list[str]] | None:
    """(day, the first ``n`` kernel ids by rank) of the newest warm list written, or
    None when there is none yet (or the newest cannot be read: warming then falls back
    to the cache's own access counts)."""
    keys = list_parquet(store, f"{DAILY_PREFIX}/warm_list")
    if not keys:
        return None
    key = keys[-1][0]  # sorted: the newest date= is last
    try:
        table = read_parquet_object(store, key)
    except DamagedFile:
        return None
    ranked = table.sort_by("rank").column("kernel_id").to_pylist()[:n]
    return hive_partition(key)[0], ranked


# -- reading ----------------------------------------------------------------------------
def sql_text(name: str) -> str:
    """``sql/analytics/<name>.sql``: packaged inside the wheel, or the repository's own."""
    here = Path(__file__).resolve()  # esper_assets/analytics/rollups.py
    packaged = here.parents[1] / "sql"
    root = packaged if packaged.is_dir() else here.parents[2] / "sql"
    return (root / "analytics" / f"{name}.sql").read_text()


def _run_on_events(
    sql: str, store: ObjectStore, read: EventsRead, view: str = "day_events", **tables: pa.Table
) -> pa.Table:
    # Without the standard views: they would read every day's files, the rollup needs one.
    with AnalyticsSession(store, standard_views=False) as session:
        session.register(view, read.table)
        for name, table in tables.items():
            session.register(name, table)
        return session.query(sql_text(sql))


def _taken_in_pieces(table: pa.Table, order: pa.ChunkedArray) -> Iterator[pa.Table]:
    """``table``'s rows in ``order``, PIECE rows at a time: a piece is encoded while the
    next is taken, and its buffers are reused for the one after (at 10 million rows the
    whole sorted copy cost more in page faults than in copying). Each column is made one
    chunk first (Arrow's take over many chunks is 4x slower), and a histogram (a list
    of BUCKETS counts: conform checked) moves as a fixed-size list, which Arrow takes
    15x faster than a list."""
    order = order.combine_chunks()
    fixed = pa.list_(pa.int64(), BUCKETS)
    columns = [
        (column.cast(fixed) if pa.types.is_list(column.type) else column).combine_chunks()
        for column in table.columns
    ]
    for start in range(0, len(order), PIECE):
        rows = order.slice(start, PIECE)
        taken = [column.take(rows) for column in columns]
        yield pa.Table.from_arrays(
            [t.cast(f.type) for t, f in zip(taken, table.schema, strict=True)],
            schema=table.schema,
        )


def _latency_bounds() -> pa.Table:
    """Bucket number (1-based, as DuckDB counts list elements) -> its upper bound in us;
    the overflow bucket's is +inf."""
    bounds = [*LATENCY_BOUNDS_US, math.inf]
    return pa.table({"bucket": pa.array(range(1, len(bounds) + 1), pa.int64()),
                     "upper_us": pa.array(bounds, pa.float64())})  # fmt: skip


def _one_row(values: dict) -> pa.Table:
    return pa.table({name: [value] for name, value in values.items()})


# -- the repository ----------------------------------------------------------------------
def _search_all(repo: AssetRepository, query: AssetQuery) -> Iterator:
    offset = 0
    while batch := repo.search_assets(query.order_by("created_at").limit(PAGE).offset(offset)):
        yield from batch
        offset += len(batch)


def _repo_assets(repo: AssetRepository, query: AssetQuery) -> pa.Table:
    now = datetime.now(UTC)
    rows = [
        {"asset_id": m.asset_id, "asset_type": m.asset_type, "name": m.name,
         "version": m.version, "state": m.state, "created_at": m.created_at,
         "size_bytes": m.size_bytes, "derived_from": list(m.derived_from),
         "expired": m.expires_at is not None and m.expires_at <= now}
        for m in _search_all(repo, query)
    ]  # fmt: skip
    return pa.Table.from_pylist(rows, schema=REPO_ASSETS_SCHEMA)


def _checkpoint_kernels(repo: AssetRepository) -> pa.Table:
    """Every kernel id a live checkpoint names: the kernels it was derived from and the
    ones its manifest lists (a kernel registered after the save is only there). The
    search leaves out expired rows, i.e. checkpoints retention deleted."""
    named: set[str] = set()
    for checkpoint in _search_all(repo, AssetQuery().with_type("checkpoint")):
        named.update(checkpoint.derived_from, checkpoint.properties.get("kernels", []))
    return pa.table({"kernel_id": pa.array(sorted(named), pa.string())})


# -- writing ------------------------------------------------------------------------------
def _write(store: ObjectStore, name: str, day: date, table: pa.Table, read: Provenance) -> Rollup:
    table = table.cast(OUTPUT_SCHEMAS[name])
    return _put(store, name, day, [table], read, table.num_rows)._replace(table=table)


def _put(
    store: ObjectStore, name: str, day: date, pieces: Iterable[pa.Table], read: Provenance,
    rows: int,
) -> Rollup:  # fmt: skip
    """``pieces`` (in OUTPUT_SCHEMAS[name]) as one zstd Parquet file at the day's key,
    with ``read`` in its metadata. A piece is encoded on another thread while the
    next is made."""
    schema = OUTPUT_SCHEMAS[name].with_metadata({PROVENANCE_KEY: read.to_json()})
    sink = io.BytesIO()
    with (
        pq.ParquetWriter(sink, schema, compression="zstd") as writer,
        ThreadPoolExecutor(1, thread_name_prefix="parquet-encode") as encoder,
    ):
        pending = None
        for piece in pieces:
            if pending is not None:
                pending.result()
            pending = encoder.submit(writer.write_table, piece)
        if pending is not None:
            pending.result()
    key = daily_key(name, day)
    store.put(key, sink.getbuffer())
    return Rollup(key, rows, None, read.events, read.files, read.bytes_in, sink.tell(),
                  read.skipped, read.day_files)  # fmt: skip


# -- arguments ------------------------------------------------------------------------------
def _day(day: object) -> date:
    if isinstance(day, datetime) or not isinstance(day, date):
        raise InvalidInput(
            f"day must be a datetime.date (the UTC day to roll up), not {type(day).__name__} "
            f"{day!r:.40}; pass e.g. date(2026, 1, 31) or date.fromisoformat('2026-01-31')"
        )
    return day


def _count(what: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInput(f"{what} must be a whole number >= 1, not {value!r:.40}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
