"""Reading the usage files back: every file under ``usage/events/`` (or one day's), each
read on its own so a damaged one is skipped and named rather than failing the lot.

Files come through the :class:`ObjectStore` (a directory or S3), never through a
DuckDB extension: a machine may be offline. Each file is conformed to
:data:`EVENT_SCHEMA` (extra columns dropped, a missing measurement filled with zeros)
and gets the ``date`` and ``hour`` of its path, as a hive reader would add them.

May import: ``esper_assets.errors``, ``storage``, ``analytics.schema``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from esper_assets.analytics.schema import BUCKETS, DAILY_PREFIX, EVENT_SCHEMA, EVENTS_PREFIX
from esper_assets.errors import StorageError, TierUnavailable
from esper_assets.storage.objects import ObjectStore

__all__ = [
    "READ_SCHEMA",
    "EventsRead",
    "event_keys",
    "hive_partition",
    "read_events",
    "read_parquet_object",
    "read_usage",
    "used_ids",
]

# The path columns a hive reader adds to every row.
READ_SCHEMA = EVENT_SCHEMA.append(pa.field("date", pa.string(), nullable=False)).append(
    pa.field("hour", pa.int32(), nullable=False)
)

# What ``used_ids`` reads: each id a file names, and in how many of its rows.
USED_IDS_SCHEMA = pa.schema([pa.field("id", pa.string()), pa.field("rows", pa.int64())])

# Without these a row says nothing (whose use, of what); a file lacking one is skipped.
IDENTITY_COLUMNS = ("window_start", "host", "pid", "source", "id", "op", "tier")
READERS = 4  # files read at once
PROVENANCE_KEY = b"esper.read"  # a rollup file's metadata: what it was made from

_PARTITION = re.compile(r"/date=(\d{4}-\d{2}-\d{2})/(?:hour=(\d{2})/)?[^/]+$")


class EventsRead(NamedTuple):
    table: pa.Table  # READ_SCHEMA: EVENT_SCHEMA plus date (YYYY-MM-DD) and hour (or as asked)
    files: int  # files read
    bytes: int  # their stored size
    skipped: list[tuple[str, str]]  # (object key, reason) of damaged or unreadable files


class Provenance(NamedTuple):
    """What a rollup was made from; kept in its file's metadata (``esper.read``)."""

    events: int  # usage rows read
    files: int  # usage files read
    bytes_in: int  # their stored size
    skipped: list[tuple[str, str]]  # (key, reason) of usage files that could not be read
    day_files: int  # the usage files of the rollup's own day it saw (read or skipped)

    @classmethod
    def of(cls, read: EventsRead, day_files: int | None = None) -> Provenance:
        seen = read.files + len(read.skipped) if day_files is None else day_files
        return cls(read.table.num_rows, read.files, read.bytes, list(read.skipped), seen)

    @classmethod
    def merged(cls, parts: list[Provenance], day_files: int) -> Provenance:
        return cls(sum(p.events for p in parts), sum(p.files for p in parts),
                   sum(p.bytes_in for p in parts), [s for p in parts for s in p.skipped],
                   day_files)  # fmt: skip

    def to_json(self) -> bytes:
        return json.dumps(self._asdict()).encode()

    @classmethod
    def from_file(cls, table: pa.Table) -> Provenance | None:
        """The provenance a rollup file carries; None when it has none (or not ours)."""
        raw = (table.schema.metadata or {}).get(PROVENANCE_KEY)
        try:
            found = json.loads(raw)
            return cls(found["events"], found["files"], found["bytes_in"],
                       [tuple(s) for s in found["skipped"]], found["day_files"])  # fmt: skip
        except (TypeError, ValueError, KeyError):
            return None


class DamagedFile(Exception):
    """One file cannot be read into the schema; the reason is the message."""


def _day_prefix(base: str, day: date | None) -> str:
    return f"{base}/" if day is None else f"{base}/date={day:%Y-%m-%d}/"


def list_parquet(store: ObjectStore, base: str, day: date | None = None) -> list[tuple[str, int]]:
    """(key, size) of the Parquet files under ``base`` (one day's or all), sorted."""
    return [(key, size) for key, size, _ in _listing(store, _day_prefix(base, day))]


def _listing(store: ObjectStore, prefix: str) -> list[tuple[str, int, float]]:
    """(key, size, mtime) of the Parquet files under ``prefix``, sorted."""
    try:
        found = [entry for entry in store.list(prefix) if entry[0].endswith(".parquet")]
    except TierUnavailable as exc:
        raise TierUnavailable(
            f"cannot list {prefix} in {store.location}: {exc}; check that the object "
            "store is up and that AWS_ENDPOINT_URL / ESPER_S3_BUCKET point at it"
        ) from exc
    return sorted(found)


def event_keys(store: ObjectStore, day: date | None = None) -> list[tuple[str, int]]:
    """(key, size) of the usage files under ``usage/events/`` (one day's or all), sorted."""
    return list_parquet(store, EVENTS_PREFIX, day)


def hive_partition(key: str) -> tuple[str, int | None]:
    """The ``date`` (and ``hour``, None when the path has none) of a key at the layout."""
    match = _PARTITION.search(key)
    if match is None:
        raise DamagedFile("not at the hive layout .../date=YYYY-MM-DD/[hour=HH/]NAME.parquet")
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def read_parquet_object(store: ObjectStore, key: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet object as a table (only ``columns``, when given); DamagedFile when it
    is gone, not Parquet or lacks a column asked for. An unreachable store raises
    TierUnavailable: that is no fault of the file."""
    try:
        data = store.get(key)
    except TierUnavailable as exc:
        raise TierUnavailable(
            f"cannot read {key} from {store.location}: {exc}; check that the object store is up"
        ) from exc
    except StorageError as exc:  # an answer of no (e.g. AccessDenied) for this object alone
        raise DamagedFile(f"cannot be read: {exc}") from exc
    if data is None:
        raise DamagedFile("deleted between listing and reading")
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError) as exc:
        raise DamagedFile(f"not a readable Parquet file: {_one_line(exc)}") from exc


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def _zeros(field: pa.Field, rows: int) -> pa.Array:
    """A missing measurement: zero requests, bytes, latency, an empty histogram."""
    if pa.types.is_list(field.type):
        return pa.array([[0] * BUCKETS] * rows, type=field.type)
    return pa.array([0] * rows, type=field.type)


def conform(table: pa.Table) -> pa.Table:
    """``table`` in EVENT_SCHEMA: columns in its order and types, extras dropped, a
    missing measurement filled with zeros; DamagedFile when that cannot be done."""
    columns = []
    for field in EVENT_SCHEMA:
        if field.name not in table.column_names:
            if field.name in IDENTITY_COLUMNS:
                raise DamagedFile(f"has no {field.name!r} column")
            columns.append(_zeros(field, table.num_rows))
            continue
        column = table.column(field.name)
        if column.null_count and field.name in IDENTITY_COLUMNS:
            raise DamagedFile(f"has nulls in {field.name!r}")
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DamagedFile(
                f"column {field.name!r} is {column.type}, not {field.type}: {_one_line(exc)}"
            ) from exc
    _check_histograms(columns[EVENT_SCHEMA.get_field_index("latency_hist")])
    return pa.Table.from_arrays(columns, schema=EVENT_SCHEMA)


def _check_histograms(column: pa.ChunkedArray) -> None:
    """Every latency histogram has one count per bucket: the rollups read bucket i of
    each (and compaction moves them as fixed-size lists)."""
    lengths = pc.list_value_length(column)
    if pc.any(pc.not_equal(pc.fill_null(lengths, 0), BUCKETS)).as_py():
        raise DamagedFile(f"has latency_hist rows that are not {BUCKETS} counts long")


def _usage_partition(key: str) -> tuple[str, int]:
    """A usage file's (date, hour); DamagedFile when its path is off the layout."""
    day, hour = hive_partition(key)
    if hour is None:
        raise DamagedFile("has no hour=HH folder in its path")
    return day, hour


def _read_event_file(store: ObjectStore, key: str) -> pa.Table:
    day, hour = _usage_partition(key)
    table = conform(read_parquet_object(store, key))
    rows = table.num_rows
    table = table.append_column(READ_SCHEMA.field("date"), pa.repeat(day, rows))
    return table.append_column(
        READ_SCHEMA.field("hour"), pa.repeat(pa.scalar(hour, pa.int32()), rows)
    )


def read_events(store: ObjectStore, day: date | None = None) -> EventsRead:
    """Every usage file (of ``day``) as one table in READ_SCHEMA; damaged files are
    skipped and named in ``skipped``. An empty day is an empty table."""
    return _read_files(store, event_keys(store, day))


def used_ids(store: ObjectStore, day: date) -> EventsRead:
    """The ids the day's usage files name, as a table of (id, rows): per file, how many
    of its rows name the id. Only the ``id`` column is read (the histograms are most of
    a file's bytes), so a month of days is cheap to ask what was used."""
    return _read_files(store, event_keys(store, day), _read_ids, USED_IDS_SCHEMA)


def _read_ids(store: ObjectStore, key: str) -> pa.Table:
    _usage_partition(key)  # off the layout: skipped, as read_events skips it
    ids = read_parquet_object(store, key, columns=["id"]).column("id")
    if ids.null_count:
        raise DamagedFile("has nulls in 'id'")
    counts = pc.value_counts(ids.cast(pa.string()))
    return pa.Table.from_arrays(
        [counts.field("values"), counts.field("counts")], schema=USED_IDS_SCHEMA
    )


def _read_files(
    store: ObjectStore,
    keys: list[tuple[str, int]],
    read_one: Callable[[ObjectStore, str], pa.Table] = _read_event_file,
    schema: pa.Schema = READ_SCHEMA,
) -> EventsRead:
    """The usage files ``keys`` (key, size), each by ``read_one``, four at a time
    (pyarrow decodes without the GIL: 2x on two cores)."""

    def read_or_damaged(key: str) -> pa.Table | DamagedFile:
        try:
            return read_one(store, key)
        except DamagedFile as exc:
            return exc

    with ThreadPoolExecutor(READERS, thread_name_prefix="usage-read") as pool:
        outcomes = list(pool.map(read_or_damaged, [k for k, _ in keys]))
    tables, skipped, files, size = [], [], 0, 0
    for (key, stored), outcome in zip(keys, outcomes, strict=True):
        if isinstance(outcome, DamagedFile):
            skipped.append((key, str(outcome)))
            continue
        tables.append(outcome)
        files += 1
        size += stored
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    return EventsRead(table, files, size, skipped)


# -- every day, the compacted ones from their one file ------------------------------------
def read_usage(store: ObjectStore) -> EventsRead:
    """Every day's usage rows. A day ``usage_events_daily`` compacted is read from its
    one file (one GET, not one per flush) unless files landed after it: more than it
    saw, or one written after it. Such a day is read from its usage files, as is a day
    never compacted (or whose compacted file is damaged)."""
    raw = _listing(store, f"{EVENTS_PREFIX}/")
    landed: dict[str, tuple[int, float]] = {}  # day -> (its usage files, the newest's mtime)
    for key, _, mtime in raw:
        if (day := _day_of(key)) is not None:
            count, newest = landed.get(day, (0, 0.0))
            landed[day] = (count + 1, max(newest, mtime))
    compacted: dict[str, tuple[pa.Table, Provenance]] = {}
    for key, _, mtime in _listing(store, f"{DAILY_PREFIX}/events/"):
        day = _day_of(key)
        count, newest = landed.get(day, (0, 0.0))
        if day is not None and newest <= mtime and (found := _compacted(store, key, count)):
            compacted[day] = found
    read = _read_files(
        store, [(key, size) for key, size, _ in raw if _day_of(key) not in compacted]
    )
    parts = [made for _, made in compacted.values()]
    return EventsRead(
        pa.concat_tables(
            [read.table] + [_with_path_columns(t, d) for d, (t, _) in compacted.items()]
        ),
        read.files + sum(p.files for p in parts),
        read.bytes + sum(p.bytes_in for p in parts),
        read.skipped + [s for p in parts for s in p.skipped],
    )


def _day_of(key: str) -> str | None:
    match = _PARTITION.search(key)
    return match.group(1) if match else None


def _compacted(store: ObjectStore, key: str, day_files: int) -> tuple[pa.Table, Provenance] | None:
    """A compacted day's rows and provenance if it saw at least the ``day_files`` usage
    files the day has now; else None (then the day is read from those files: a damaged
    compacted file loses nothing)."""
    try:
        table = read_parquet_object(store, key)
    except DamagedFile:
        return None
    made = Provenance.from_file(table)
    if made is None or day_files > made.day_files:
        return None
    try:
        return conform(table), made
    except DamagedFile:
        return None


def _with_path_columns(table: pa.Table, day: str) -> pa.Table:
    """A compacted day's rows with the ``date`` and ``hour`` its usage files' paths had."""
    hours = pc.hour(table.column("window_start")).cast(pa.int32())
    table = table.append_column(READ_SCHEMA.field("date"), pa.repeat(day, table.num_rows))
    return table.append_column(READ_SCHEMA.field("hour"), hours)
