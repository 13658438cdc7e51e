"""The two SQL dialects behind AssetRepository.

The repository writes its SQL once, with ``%s`` placeholders and two casts
(``{jsonb}``, ``{textarr}``); a backend turns that into its dialect and owns
what really differs: connections and transactions, how arrays, JSON and times
are stored, how name locks are taken, and the bulk path (binary COPY on
PostgreSQL, one ``executemany`` on SQLite).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from esper_assets.errors import AssetConflict, DurableWriteError, redact_url
from esper_assets.storage.db.migrations import migrate_postgres, migrate_sqlite
from esper_assets.storage.db.postgres import ConnectionPool, lock_wait
from esper_assets.storage.db.sqlite import SqliteFile, sqlite_errors, write_transaction

MAX_NAME_LOCKS = 32  # above this many names, a batch locks all writers out instead

ASSET_COLUMNS = (
    "asset_id", "asset_type", "name", "version", "version_number", "previous_version_id",
    "created_at", "created_by", "parent_id", "derived_from", "tags", "properties",
    "compilation_time_ms", "size_bytes", "checksum", "data", "object_key", "last_accessed",
    "access_count", "state", "expires_at", "created_event",
)  # fmt: skip
# created_event: the event_id of the "created" row in asset_events, which for a batch
# is one row for all its assets (see AssetRepository.get_audit_log). Not metadata.


def _as_is(text: str) -> str:
    return text


# One encoder, not one per call; UTF-8 kept as is so stored JSON reads (and searches) naturally.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


def dump_json(value: Any) -> str:
    """Compact JSON text, UTF-8 kept as is; NaN refused (ValueError)."""
    return _ENCODER.encode(value)


# How long a writer may wait for another's lock: a 1,000,000-row bulk load holds the
# writers' lock for about 40 s on a 2-core machine.
LOCK_WAIT_S = 120.0


class PostgresAssets:
    dialect = "postgres"
    COPY_TYPES = (
        "text",
        "text",
        "text",
        "text",
        "int4",
        "text",
        "timestamptz",
        "text",
        "text",
        "text[]",
        "text[]",
        "jsonb",
        "float8",
        "int8",
        "text",
        "bytea",
        "text",
        "timestamptz",
        "int8",
        "text",
        "timestamptz",
        "int8",
    )  # fmt: skip  (ASSET_COLUMNS order)

    def __init__(self, url: str, pool_size: int = 8, timeout_s: float = 3.0) -> None:
        import psycopg
        from psycopg.types.json import Jsonb

        self._psycopg = psycopg
        self._jsonb = Jsonb
        self.location = redact_url(url)
        self._what = f"asset repository at {self.location}"
        self._pool = ConnectionPool(url, pool_size, timeout_s=timeout_s, statement_timeout=False)
        with self.transaction(slow=True) as conn:
            migrate_postgres(conn)

    # -- SQL text ---------------------------------------------------------------------
    @staticmethod
    @lru_cache(maxsize=256)
    def q(sql: str) -> str:
        return (
            sql.replace("{jsonb}", "::jsonb")
            .replace("{textarr}", "::text[]")
            .replace("{json_object}", "jsonb_build_object")
        )

    # -- connections --------------------------------------------------------------------
    def _refine(self, exc: Exception) -> Exception | None:
        if isinstance(exc, self._psycopg.errors.UniqueViolation):
            return AssetConflict(f"asset repository: {exc.diag.message_detail or exc}")
        return None

    def read(self, slow: bool = False):
        """A pooled connection. ``slow``: work known to take long (ANALYZE) gets
        SLOW_WORK_S, not timeout_s."""
        return self._pool.session(self._what, False, slow, self._refine)

    @contextmanager
    def transaction(self, slow: bool = False) -> Iterator[Any]:
        """``slow``: migrations and bulk loads get SLOW_WORK_S, not timeout_s."""
        with (
            self._pool.session(self._what, True, slow, self._refine) as conn,
            conn.transaction(),
        ):
            yield conn

    def lock_names(self, conn, keys: Sequence[str]) -> None:
        """Serialise writers of the same (type, name) until the transaction ends.

        Every writer holds one "all assets" advisory lock: shared for a few names,
        each of which it then locks in sorted order (so two writers cannot
        deadlock), exclusive for a batch of many names, which thereby excludes all
        other writers with a single lock. Locking 50,000 names one by one ran
        PostgreSQL out of lock-table memory.
        """
        names = sorted({"esper-asset:" + key for key in keys})
        with lock_wait(conn, LOCK_WAIT_S):
            if len(names) > MAX_NAME_LOCKS:
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('esper-asset:*'))")
                return
            conn.execute(
                "SELECT pg_advisory_xact_lock_shared(hashtext('esper-asset:*')),"
                " (SELECT count(pg_advisory_xact_lock(hashtext(k)))"
                "  FROM (SELECT k FROM unnest(%s::text[]) AS k ORDER BY k) AS sorted)",
                (names,),
            )

    def fetchall(self, conn, sql: str, params: Sequence = ()) -> list[tuple]:
        return conn.execute(self.q(sql), params).fetchall()

    def execute(self, conn, sql: str, params: Sequence = ()) -> int:
        return conn.execute(self.q(sql), params).rowcount

    def executemany(self, conn, sql: str, rows: Sequence[Sequence]) -> None:
        with conn.cursor() as cur:
            cur.executemany(self.q(sql), rows)  # pipelined by psycopg

    @staticmethod
    def in_list(column: str, values: Sequence) -> tuple[str, list]:
        return f"{column} = ANY(%s)", [list(values)]

    # -- values -------------------------------------------------------------------------
    def encode_json(self, value: Any):
        return self._jsonb(value)

    def encode_json_text(self, text: str):
        """JSON already serialised: sent as is, not dumped again."""
        return self._jsonb(text, dumps=_as_is)

    @staticmethod
    def encode_list(items: Sequence[str]) -> list[str]:
        return list(items)

    @staticmethod
    def decode_list(value) -> list[str]:
        return list(value or [])

    @staticmethod
    def decode_json(value) -> Any:
        return value

    @staticmethod
    def encode_time(dt: datetime | None):
        return dt

    @staticmethod
    def decode_time(value) -> datetime | None:
        return value

    @staticmethod
    def now():
        return datetime.now(UTC)

    # -- filters ------------------------------------------------------------------------
    def tags_filter(self, tags: Sequence[str], match_all: bool) -> tuple[str, list]:
        return ("tags @> %s::text[]" if match_all else "tags && %s::text[]"), [list(tags)]

    def properties_filter(self, properties: dict) -> tuple[str, list]:
        return "properties @> %s::jsonb", [dump_json(properties)]

    def text_filter(self, needle: str) -> tuple[str, list]:
        """Case-insensitive substring of the name or of any scalar value in properties
        (not keys, not JSON punctuation)."""
        pattern = _like_pattern(needle)
        return (
            "(name ILIKE %s ESCAPE '\\' OR EXISTS (SELECT 1 FROM jsonb_path_query(properties, 'strict $.**') AS v"
            " WHERE jsonb_typeof(v) IN ('string', 'number', 'boolean') AND v #>> '{}' ILIKE %s ESCAPE '\\'))",
            [pattern, pattern],
        )

    # -- access counts --------------------------------------------------------------------
    # Concurrent flushes from several processes must not deadlock: every flush first
    # locks its rows in asset_id order (FOR UPDATE below a sort, in a MATERIALIZED CTE),
    # and the UPDATE only touches rows that came out of that CTE, i.e. rows this
    # transaction already holds, so the only lock waits happen in one global order.
    # (UPDATE ... FROM (SELECT ... ORDER BY) alone would lock in join order, which is
    # not guaranteed.) GREATEST: the latest access wins, whichever process flushes last.
    ACCESS_SQL = (
        "WITH batch AS MATERIALIZED ("
        " SELECT * FROM unnest(%s::text[], %s::int8[], %s::timestamptz[]) AS b(asset_id, n, at)),"
        " locked AS MATERIALIZED ("
        " SELECT a.asset_id FROM assets a WHERE a.asset_id IN (SELECT asset_id FROM batch)"
        " ORDER BY a.asset_id FOR UPDATE)"
        " UPDATE assets SET access_count = assets.access_count + batch.n,"
        " last_accessed = GREATEST(assets.last_accessed, batch.at)"
        " FROM locked JOIN batch USING (asset_id) WHERE assets.asset_id = locked.asset_id"
    )

    def add_access_counts(self, conn, rows: Sequence[tuple[str, int, datetime]]) -> int:
        """Add (asset_id, count, last access) rows in one statement; rows updated."""
        ids, counts, times = (list(column) for column in zip(*sorted(rows), strict=True))
        return conn.execute(self.ACCESS_SQL, (ids, counts, times)).rowcount

    # -- bulk ---------------------------------------------------------------------------
    def insert_rows(self, conn, rows: Iterable[tuple], count: int) -> None:
        """``count`` full asset rows (ASSET_COLUMNS order): INSERT for a few, binary COPY
        for many. ``rows`` may be a generator: COPY streams each row as it is built, so
        building the next rows overlaps with the server inserting the previous ones."""
        if count < 16:  # COPY's extra round trip only pays off for batches
            marks = ", ".join(["%s"] * len(ASSET_COLUMNS))
            self.executemany(
                conn,
                f"INSERT INTO assets ({', '.join(ASSET_COLUMNS)}) VALUES ({marks})",
                list(rows),
            )
            return
        self.copy_rows(conn, "assets", rows)

    def copy_rows(self, conn, table: str, rows: Iterable[tuple]) -> None:
        """Binary COPY of full asset rows into ``table`` (assets, or a twin of it)."""
        with (
            conn.cursor() as cur,
            cur.copy(
                f"COPY {table} ({', '.join(ASSET_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(self.COPY_TYPES)
            write_row = copy.write_row
            for row in rows:
                write_row(row)

    def insert_event(self, conn, event: tuple) -> int:
        """One event row; its event_id."""
        return conn.execute(
            "INSERT INTO asset_events (asset_id, event, actor, at, details)"
            " VALUES (%s, %s, %s, %s, %s) RETURNING event_id",
            event,
        ).fetchone()[0]

    def insert_events(self, conn, events: list[tuple]) -> None:
        if len(events) < 16:
            self.executemany(
                conn,
                "INSERT INTO asset_events (asset_id, event, actor, at, details) VALUES (%s, %s, %s, %s, %s)",
                events,
            )
            return
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY asset_events (asset_id, event, actor, at, details) FROM STDIN (FORMAT BINARY)"
            ) as copy,
        ):
            copy.set_types(["text", "text", "text", "timestamptz", "jsonb"])
            for event in events:
                copy.write_row(event)

    def close(self) -> None:
        self._pool.close()


class SqliteAssets:
    dialect = "sqlite"

    def __init__(self, path: Path | str, timeout_s: float = 10.0) -> None:
        self._file = SqliteFile(path, timeout_s, prepare=_prepare)
        self.path = self._file.path
        self.location = self._file.location
        self._what = f"asset repository at {self.path}"
        with sqlite_errors(self._what, True):
            migrate_sqlite(self._file.thread_connection())

    @staticmethod
    @lru_cache(maxsize=256)
    def q(sql: str) -> str:
        return (
            sql.replace("{jsonb}", "")
            .replace("{textarr}", "")
            .replace("{json_object}", "json_object")
            .replace("%s", "?")
        )

    def _refine(self, exc: Exception) -> Exception | None:
        if not isinstance(exc, sqlite3.IntegrityError):
            return None
        if "UNIQUE" in str(exc):
            return AssetConflict(f"asset repository: {exc}")
        return DurableWriteError(f"{self._what} refused the write: {exc}")

    def read(self, slow: bool = False):
        return self._file.session(self._what, False, self._refine)

    @contextmanager
    def transaction(self, slow: bool = False) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the database's write lock: writers are serialised,
        # which is what lock_names has to achieve on PostgreSQL.
        with sqlite_errors(self._what, True, self._refine):
            conn = self._file.thread_connection()
            with write_transaction(conn):
                yield conn

    def lock_names(self, conn, keys: Sequence[str]) -> None:
        pass  # BEGIN IMMEDIATE already holds the only write lock

    def fetchall(self, conn, sql: str, params: Sequence = ()) -> list[tuple]:
        return conn.execute(self.q(sql), params).fetchall()

    def execute(self, conn, sql: str, params: Sequence = ()) -> int:
        return conn.execute(self.q(sql), params).rowcount

    def executemany(self, conn, sql: str, rows: Sequence[Sequence]) -> None:
        conn.executemany(self.q(sql), rows)

    @staticmethod
    def in_list(column: str, values: Sequence) -> tuple[str, list]:
        return f"{column} IN ({','.join('?' * len(values))})", list(values)

    @staticmethod
    def encode_json(value: Any) -> str:
        return dump_json(value)

    @staticmethod
    def encode_json_text(text: str) -> str:
        return text

    @staticmethod
    def encode_list(items: Sequence[str]) -> str:
        return dump_json(list(items)) if items else "[]"

    @staticmethod
    def decode_list(value) -> list[str]:
        return json.loads(value) if value else []

    @staticmethod
    def decode_json(value) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @staticmethod
    def encode_time(dt: datetime | None) -> float | None:
        return None if dt is None else dt.timestamp()

    @staticmethod
    def decode_time(value) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, UTC)

    @staticmethod
    def now() -> float:
        return time.time()

    def tags_filter(self, tags: Sequence[str], match_all: bool) -> tuple[str, list]:
        marks = ",".join("?" * len(tags))
        found = (
            f"(SELECT count(DISTINCT value) FROM json_each(assets.tags) WHERE value IN ({marks}))"
        )
        return (f"{found} = {len(set(tags))}" if match_all else f"{found} > 0"), list(tags)

    def properties_filter(self, properties: dict) -> tuple[str, list]:
        # SQLite has no @>; a Python function gives the same semantics (see json_contains)
        # without building JSON paths from user-supplied keys.
        return "esper_json_contains(properties, ?)", [dump_json(properties)]

    def text_filter(self, needle: str) -> tuple[str, list]:
        # SQLite's LIKE folds ASCII case only; a Python function matches ILIKE's behaviour.
        return "esper_text_match(name, properties, ?)", [needle.casefold()]

    def add_access_counts(self, conn, rows: Sequence[tuple[str, int, float]]) -> int:
        """Add (asset_id, count, last access) rows; rows updated. BEGIN IMMEDIATE already
        serialises writers (no deadlock possible); sorted anyway, like PostgreSQL."""
        before = conn.total_changes
        conn.executemany(
            "UPDATE assets SET access_count = access_count + ?,"
            " last_accessed = max(COALESCE(last_accessed, 0), ?) WHERE asset_id = ?",
            [(n, at, asset_id) for asset_id, n, at in sorted(rows)],
        )
        return conn.total_changes - before

    def insert_rows(self, conn, rows: Iterable[tuple], count: int) -> None:
        marks = ",".join("?" * len(ASSET_COLUMNS))
        conn.executemany(f"INSERT INTO assets ({', '.join(ASSET_COLUMNS)}) VALUES ({marks})", rows)

    @staticmethod
    def insert_event(conn, event: tuple) -> int:
        return conn.execute(
            "INSERT INTO asset_events (asset_id, event, actor, at, details) VALUES (?, ?, ?, ?, ?)",
            event,
        ).lastrowid

    def insert_events(self, conn, events: list[tuple]) -> None:
        conn.executemany(
            "INSERT INTO asset_events (asset_id, event, actor, at, details) VALUES (?, ?, ?, ?, ?)",
            events,
        )

    def close(self) -> None:
        self._file.close()


def _prepare(conn: sqlite3.Connection) -> None:
    """What the repository's queries need on every SQLite connection."""
    conn.execute("PRAGMA foreign_keys=ON")
    conn.create_function("esper_json_contains", 2, _sqlite_contains, deterministic=True)
    conn.create_function("esper_text_match", 3, _sqlite_text_match, deterministic=True)


def json_contains(stored: Any, wanted: Any) -> bool:
    """PostgreSQL's ``@>`` on decoded JSON: objects recursively, arrays as subsets."""
    if isinstance(wanted, dict):
        return isinstance(stored, dict) and all(
            key in stored and json_contains(stored[key], value) for key, value in wanted.items()
        )
    if isinstance(wanted, list):
        return isinstance(stored, list) and all(
            any(json_contains(have, want) for have in stored) for want in wanted
        )
    if isinstance(wanted, bool) or isinstance(stored, bool):
        return stored is wanted
    return stored == wanted


def _sqlite_contains(stored: str, wanted: str) -> int:
    return int(json_contains(json.loads(stored), json.loads(wanted)))


def _scalars(value: Any) -> Iterator[str]:
    """Every scalar in a JSON value as text, the way PostgreSQL's ``#>> '{}'`` prints it."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, list):
        for item in value:
            yield from _scalars(item)
    elif isinstance(value, str):
        yield value
    elif value is not None:
        yield dump_json(value)  # numbers and booleans as JSON spells them


def _sqlite_text_match(name: str, properties: str, folded_needle: str) -> int:
    if folded_needle in name.casefold():
        return 1
    return int(any(folded_needle in text.casefold() for text in _scalars(json.loads(properties))))


def _like_pattern(needle: str) -> str:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"
