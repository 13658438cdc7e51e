"""L3: the durable tier, on PostgreSQL (production) or a SQLite file (embedded).

Both share one contract; only connection handling and SQL text differ. Reads
never write: access counts are gathered in memory by the cache and flushed in
batches through :meth:`SqlTier.record_access`.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper_assets.errors import redact_url
from esper_assets.storage.db.migrations import migrate_postgres, migrate_sqlite
from esper_assets.storage.db.postgres import ConnectionPool
from esper_assets.storage.db.sqlite import SqliteFile, write_transaction


class InObjectStore:
    """Marker returned for a pointer row: the value lives in the object store (L4)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "IN_OBJECT_STORE"


IN_OBJECT_STORE = InObjectStore()


@dataclass(frozen=True, slots=True)
class Changes:
    """What the change log says since a reader's last look (see sql/*/004).

    ``ids`` is None when more changed than the reader asked to see: drop everything.
    ``l2_stale`` are ids whose Redis copy some process could not update or remove.
    """

    cursor: str
    ids: list[str] | None
    l2_stale: list[str]


@dataclass(frozen=True, slots=True)
class Row:
    """One row to upsert. ``data`` is the frame, or None with ``object_key`` set."""

    key: str
    data: bytes | None
    object_key: str | None
    metadata: Mapping[str, Any]
    size_bytes: int
    stored_bytes: int
    compressed: bool
    created_at: float
    expires_at: float | None


class SqlTier:
    name = "l3"
    durable = True
    location: str
    ttl_seconds: float | None

    # -- dialect hooks ------------------------------------------------------
    def _connection(self):  # pragma: no cover - abstract
        raise NotImplementedError

    SQL: dict[str, str] = {}

    # -- contract -------------------------------------------------------------
    def get(self, key: str) -> bytes | InObjectStore | None:
        with self._connection() as conn:
            row = conn.execute(self.SQL["get"], (key, time.time())).fetchone()
        return None if row is None else _value(row[0])

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes | InObjectStore]:
        if not keys:
            return {}
        with self._connection() as conn:
            rows = self._select_many(conn, keys)
        return {key: _value(data) for key, data in rows}

    def put_many(self, rows: Sequence[Row], fence_s: float | None = None) -> None:
        """Upsert ``rows``. With ``fence_s`` (a promotion: a copy found in L4), an id
        deleted or overwritten in the last ``fence_s`` seconds is left alone: the copy
        may be what an invalidation running meanwhile removed."""
        params = [
            (
                r.key,
                r.data,
                r.object_key,
                json.dumps(r.metadata, separators=(",", ":"), default=str),
                r.size_bytes,
                r.stored_bytes,
                r.compressed,
                r.created_at,
                r.expires_at,
            )
            for r in rows
        ]
        # Rows in id order: two batches sharing ids then lock them in the same order
        # and cannot deadlock each other.
        params.sort(key=lambda p: p[0])
        with self._connection(write=True) as conn, self._transaction(conn):
            if fence_s is None:
                _executemany(conn, self.SQL["upsert"], params)
                return
            self._lock_ids(conn, [p[0] for p in params])
            _executemany(
                conn, self.SQL["promote"], [(*p, *self._fence(p[0], fence_s)) for p in params]
            )

    def delete_many(self, keys: Sequence[str]) -> list[str]:
        """Delete ``keys``; each leaves a row in the change log, deleted or not (a
        promotion racing this delete checks for it, see ``put_many``)."""
        with self._connection(write=True) as conn, self._transaction(conn):
            self._lock_ids(conn, keys)
            deleted = self._delete_many(conn, keys)
            missing = set(keys).difference(deleted)  # deleted rows are logged by a trigger
            _executemany(conn, self.SQL["log_gone"], [(k,) for k in sorted(missing)])
        return deleted

    def cleanup(self, log_retention_s: float = 86400) -> list[tuple[str, str | None]]:
        """Delete expired rows; return (id, object_key) of each so L4 objects go too.

        Change-log rows older than ``log_retention_s`` go as well."""
        now = time.time()
        with self._connection(write=True, slow=True) as conn:
            gone = [tuple(r) for r in conn.execute(self.SQL["cleanup"], (now,)).fetchall()]
            conn.execute(self.SQL["trim_log"], (now - log_retention_s,))
        return gone

    # -- the change log: how other processes learn what to drop from their L1 ------
    def changes_since(self, cursor: str | None, limit: int, stale_window_s: float) -> Changes:
        """Ids deleted or overwritten since ``cursor`` (None: start now, and return the
        ids marked L2-stale in the last ``stale_window_s`` seconds)."""
        with self._connection() as conn:
            if cursor is None:
                stale = conn.execute(self.SQL["stale_since"], (time.time() - stale_window_s,))
                stale_ids = sorted({r[0] for r in stale.fetchall()})
                return Changes(self._log_position(conn), [], stale_ids)
            return self._changes(conn, cursor, limit)

    def mark_l2_stale(self, keys: Sequence[str]) -> None:
        """Record that these ids' Redis copies may be stale, for every process to fence."""
        with self._connection(write=True) as conn, self._transaction(conn):
            _executemany(conn, self.SQL["mark_stale"], [(k,) for k in keys])

    def record_access(self, counts: Mapping[str, int]) -> None:
        if counts:
            with self._connection(write=True) as conn:
                self._record_access(conn, counts)

    def hottest(self, n: int) -> list[str]:
        with self._connection() as conn:
            return [r[0] for r in conn.execute(self.SQL["hottest"], (time.time(), n)).fetchall()]

    def metadata(self, key: str) -> dict[str, Any] | None:
        with self._connection() as conn:
            row = conn.execute(self.SQL["metadata"], (key,)).fetchone()
        if row is None:
            return None
        meta, size, created, expires, in_store = row
        meta = json.loads(meta) if isinstance(meta, str) else meta
        return {
            "metadata": meta,
            "size_bytes": size,
            "created_at": _epoch(created),
            "expires_at": _epoch(expires),
            "in_object_store": bool(in_store),
        }

    def size(self) -> dict[str, int]:
        with self._connection(slow=True) as conn:
            entries, stored = conn.execute(self.SQL["size"]).fetchone()
        return {"entries": int(entries), "stored_bytes": int(stored)}

    def ping(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1").fetchone()


_LOCKED = "SELECT id FROM kernel_cache WHERE {} ORDER BY id FOR UPDATE"
_LOCK_CLASS = 0x65737072  # "espr": the first key of our two-key advisory locks


def _changes_from(cursor: str, rows: list[tuple], limit: int) -> Changes:
    stale = sorted({key for key, l2_stale in rows if l2_stale})
    ids = None if len(rows) > limit else list(dict.fromkeys(key for key, _ in rows))
    return Changes(cursor, ids, stale)


def _value(data) -> bytes | InObjectStore:
    return IN_OBJECT_STORE if data is None else bytes(data)


def _epoch(value) -> float | None:
    if value is None or isinstance(value, int | float):
        return value
    return value.timestamp()


def _executemany(conn, sql: str, params: list[tuple]) -> None:
    if isinstance(conn, sqlite3.Connection):
        conn.executemany(sql, params)
    else:
        with conn.cursor() as cur:
            cur.executemany(sql, params)


_UPSERT_SET = """
    data = excluded.data, object_key = excluded.object_key, metadata = excluded.metadata,
    size_bytes = excluded.size_bytes, stored_bytes = excluded.stored_bytes,
    compressed = excluded.compressed, created_at = excluded.created_at,
    expires_at = excluded.expires_at"""


class PostgresTier(SqlTier):
    SQL = {
        "get": "SELECT data FROM kernel_cache WHERE id = %s"
        " AND (expires_at IS NULL OR expires_at > to_timestamp(%s))",
        "get_many": "SELECT id, data FROM kernel_cache WHERE id = ANY(%s)"
        " AND (expires_at IS NULL OR expires_at > to_timestamp(%s))",
        "upsert": "INSERT INTO kernel_cache (id, data, object_key, metadata, size_bytes,"
        " stored_bytes, compressed, created_at, accessed_at, expires_at)"
        " VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, to_timestamp(%s), now(), to_timestamp(%s))"
        " ON CONFLICT (id) DO UPDATE SET" + _UPSERT_SET,
        # Every statement that touches several rows locks them in id order first, so
        # concurrent writers, flushes of access counts and cleanups from several
        # processes wait for each other instead of deadlocking.
        "delete_many": "DELETE FROM kernel_cache WHERE id IN ("
        + _LOCKED.format("id = ANY(%s)")
        + ") RETURNING id",
        "cleanup": "DELETE FROM kernel_cache WHERE id IN ("
        + _LOCKED.format("expires_at <= to_timestamp(%s)")
        + ") RETURNING id, object_key",
        "lock_ids": _LOCKED.format("id = ANY(%s)"),
        # Per-id advisory locks, taken in one order: an id that has no row yet cannot
        # be locked with FOR UPDATE, and a promotion must not slip between an
        # invalidation's delete and its commit.
        "lock_keys": "SELECT pg_advisory_xact_lock(" + str(_LOCK_CLASS) + ", h)"
        " FROM (SELECT DISTINCT hashtext(k) AS h FROM unnest(%s::text[]) AS k) AS t ORDER BY h",
        "promote": "INSERT INTO kernel_cache (id, data, object_key, metadata, size_bytes,"
        " stored_bytes, compressed, created_at, accessed_at, expires_at)"
        " SELECT %s, %s, %s, %s::jsonb, %s, %s, %s, to_timestamp(%s), now(), to_timestamp(%s)"
        " WHERE NOT EXISTS (SELECT 1 FROM kernel_invalidations WHERE id = %s"
        " AND at > now() - make_interval(secs => %s))"
        " ON CONFLICT (id) DO UPDATE SET" + _UPSERT_SET,
        "log_gone": "INSERT INTO kernel_invalidations (id) VALUES (%s)",
        "record_access": "UPDATE kernel_cache AS k SET accessed_at = now(),"
        " access_count = k.access_count + t.n"
        " FROM unnest(%s::text[], %s::bigint[]) AS t(id, n) WHERE k.id = t.id",
        "trim_log": "DELETE FROM kernel_invalidations WHERE at < to_timestamp(%s)",
        "stale_since": "SELECT id FROM kernel_invalidations WHERE l2_stale AND at >= to_timestamp(%s)",
        "mark_stale": "INSERT INTO kernel_invalidations (id, l2_stale) VALUES (%s, true)",
        "position": "SELECT pg_current_snapshot()::text",
        # The rows whose transactions the reader's last snapshot did not see; the new
        # snapshot is taken by the same statement, so nothing falls between two looks.
        "changes": "WITH s AS (SELECT pg_current_snapshot() AS now, %s::pg_snapshot AS seen)"
        " SELECT s.now::text, c.id, c.l2_stale FROM s LEFT JOIN LATERAL ("
        " SELECT id, l2_stale FROM kernel_invalidations"
        " WHERE txid >= pg_snapshot_xmin(s.seen) AND NOT pg_visible_in_snapshot(txid, s.seen)"
        " ORDER BY seq LIMIT %s) c ON true",
        "hottest": "SELECT id FROM kernel_cache"
        " WHERE expires_at IS NULL OR expires_at > to_timestamp(%s)"
        " ORDER BY access_count DESC, accessed_at DESC LIMIT %s",
        "metadata": "SELECT metadata, size_bytes, created_at, expires_at, object_key IS NOT NULL"
        " FROM kernel_cache WHERE id = %s",
        "size": "SELECT count(*), coalesce(sum(stored_bytes), 0) FROM kernel_cache",
    }

    def __init__(
        self,
        url: str,
        ttl_seconds: float | None = 7 * 86400,
        pool_size: int = 8,
        timeout_s: float = 3.0,
    ) -> None:
        self.url = url
        self.location = redact_url(url)
        self.ttl_seconds = ttl_seconds
        self._pool = ConnectionPool(url, pool_size, timeout_s=timeout_s)
        with self._connection(write=True, slow=True) as conn:
            migrate_postgres(conn)

    def _connection(self, write: bool = False, slow: bool = False):
        """``slow``: maintenance (migrations, cleanup, size) may take SLOW_WORK_S."""
        return self._pool.session(f"L3 PostgreSQL at {self.location}", write, slow)

    @contextmanager
    def _transaction(self, conn):
        with conn.transaction():
            yield

    def get(self, key: str) -> bytes | InObjectStore | None:
        with self._connection() as conn:
            row = conn.execute(self.SQL["get"], (key, time.time()), binary=True).fetchone()
        return None if row is None else _value(row[0])

    def _select_many(self, conn, keys):
        return conn.execute(self.SQL["get_many"], (list(keys), time.time()), binary=True).fetchall()

    def _delete_many(self, conn, keys):
        return [r[0] for r in conn.execute(self.SQL["delete_many"], (list(keys),)).fetchall()]

    def _lock_ids(self, conn, keys) -> None:
        conn.execute(self.SQL["lock_keys"], (list(keys),))

    @staticmethod
    def _fence(key: str, fence_s: float) -> tuple:
        return (key, fence_s)

    def _record_access(self, conn, counts):
        ids = sorted(counts)
        with self._transaction(conn):
            conn.execute(self.SQL["lock_ids"], (ids,))
            conn.execute(self.SQL["record_access"], (ids, [counts[k] for k in ids]))

    def _log_position(self, conn) -> str:
        return conn.execute(self.SQL["position"]).fetchone()[0]

    def _changes(self, conn, cursor: str, limit: int) -> Changes:
        rows = conn.execute(self.SQL["changes"], (cursor, limit + 1)).fetchall()
        return _changes_from(rows[0][0], [r[1:] for r in rows if r[1] is not None], limit)

    def close(self) -> None:
        self._pool.close()


class SqliteTier(SqlTier):
    SQL = {
        "get": "SELECT data FROM kernel_cache WHERE id = ? AND (expires_at IS NULL OR expires_at > ?)",
        "upsert": "INSERT INTO kernel_cache (id, data, object_key, metadata, size_bytes,"
        " stored_bytes, compressed, created_at, accessed_at, expires_at)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9)"
        " ON CONFLICT (id) DO UPDATE SET" + _UPSERT_SET,
        "cleanup": "DELETE FROM kernel_cache WHERE expires_at <= ? RETURNING id, object_key",
        "promote": "INSERT INTO kernel_cache (id, data, object_key, metadata, size_bytes,"
        " stored_bytes, compressed, created_at, accessed_at, expires_at)"
        " SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9"
        " WHERE NOT EXISTS (SELECT 1 FROM kernel_invalidations WHERE id = ?1 AND at > ?10)"
        " ON CONFLICT (id) DO UPDATE SET" + _UPSERT_SET,
        "log_gone": "INSERT INTO kernel_invalidations (id) VALUES (?)",
        "trim_log": "DELETE FROM kernel_invalidations WHERE at < ?",
        "stale_since": "SELECT id FROM kernel_invalidations WHERE l2_stale AND at >= ?",
        "mark_stale": "INSERT INTO kernel_invalidations (id, l2_stale) VALUES (?, 1)",
        "position": "SELECT coalesce(max(seq), 0) FROM kernel_invalidations",
        "changes": "SELECT seq, id, l2_stale FROM kernel_invalidations WHERE seq > ?"
        " ORDER BY seq LIMIT ?",
        "record_access": "UPDATE kernel_cache SET accessed_at = ?, access_count = access_count + ?"
        " WHERE id = ?",
        "hottest": "SELECT id FROM kernel_cache WHERE expires_at IS NULL OR expires_at > ?"
        " ORDER BY access_count DESC, accessed_at DESC LIMIT ?",
        "metadata": "SELECT metadata, size_bytes, created_at, expires_at, object_key IS NOT NULL"
        " FROM kernel_cache WHERE id = ?",
        "size": "SELECT count(*), coalesce(sum(stored_bytes), 0) FROM kernel_cache",
    }
    _CHUNK = 500  # stay under SQLite's bound-parameter limit

    def __init__(
        self, path: Path | str, ttl_seconds: float | None = 7 * 86400, timeout_s: float = 5.0
    ):
        self._file = SqliteFile(path, timeout_s)
        self.path = self._file.path
        self.location = self._file.location
        self._what = f"L3 SQLite at {self.path}"
        self.ttl_seconds = ttl_seconds
        self.timeout_s = timeout_s
        with self._connection(write=True) as conn:
            migrate_sqlite(conn)

    def thread_connection(self) -> sqlite3.Connection:
        """This thread's connection (SQLite connections are cheap; sharing one needs a lock)."""
        return self._file.thread_connection()

    def _connection(self, write: bool = False, slow: bool = False):
        # slow: SQLite's busy timeout already covers it
        return self._file.session(self._what, write)

    @staticmethod
    def _transaction(conn):
        return write_transaction(conn)

    def _select_many(self, conn, keys):
        rows, now = [], time.time()
        for chunk in _chunks(list(keys), self._CHUNK):
            marks = ",".join("?" * len(chunk))
            rows += conn.execute(
                f"SELECT id, data FROM kernel_cache WHERE id IN ({marks})"
                " AND (expires_at IS NULL OR expires_at > ?)",
                (*chunk, now),
            ).fetchall()
        return rows

    def _delete_many(self, conn, keys):
        deleted = []
        for chunk in _chunks(list(keys), self._CHUNK):
            marks = ",".join("?" * len(chunk))
            deleted += [
                r[0]
                for r in conn.execute(
                    f"DELETE FROM kernel_cache WHERE id IN ({marks}) RETURNING id", chunk
                ).fetchall()
            ]
        return deleted

    def _record_access(self, conn, counts):
        now = time.time()
        with self._transaction(conn):
            conn.executemany(self.SQL["record_access"], [(now, n, k) for k, n in counts.items()])

    def _lock_ids(self, conn, keys) -> None:
        pass  # the write transaction (BEGIN IMMEDIATE) already excludes every other writer

    @staticmethod
    def _fence(key: str, fence_s: float) -> tuple:
        return (time.time() - fence_s,)

    def _log_position(self, conn) -> str:
        return str(conn.execute(self.SQL["position"]).fetchone()[0])

    def _changes(self, conn, cursor: str, limit: int) -> Changes:
        rows = conn.execute(self.SQL["changes"], (int(cursor), limit + 1)).fetchall()
        if len(rows) > limit:  # the reader drops everything: skip to the end of the log
            position = self._log_position(conn)
        else:
            position = str(rows[-1][0]) if rows else cursor
        return _changes_from(position, [(key, bool(stale)) for _, key, stale in rows], limit)

    def close(self) -> None:
        self._file.close()


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]
