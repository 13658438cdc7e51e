"""The chunk index: which addresses the object store holds, with their raw and
stored sizes (table ``checkpoint_chunks``, migration 005), on PostgreSQL or SQLite.

Both backends answer in one statement per batch: ``touch`` (which of these are
stored; mark them as just used), ``listed`` (the same, read-only), ``add`` (record
new chunks; which rows this call inserted), ``remove`` and ``totals``; garbage
collection reads ``ages`` and deletes with ``remove_stale``, whose transaction stays
open while the object is deleted: a save that touches or re-adds the chunk meanwhile
waits for it, then finds the row gone and writes the object again. Rows are
locked and inserted in address order on PostgreSQL, so two savers of overlapping
batches wait for each other instead of deadlocking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from esper_assets.errors import redact_url
from esper_assets.storage.db.migrations import migrate_postgres, migrate_sqlite
from esper_assets.storage.db.postgres import ConnectionPool
from esper_assets.storage.db.sqlite import SqliteFile, write_transaction


class Row(NamedTuple):
    address: str
    size: int
    stored_size: int


class ChunkIndex(Protocol):
    location: str

    def touch(self, addresses: Sequence[str]) -> dict[str, int]:
        """{address: stored_size} of those listed; their touched_at becomes now."""
        ...

    def listed(self, addresses: Sequence[str]) -> dict[str, int]: ...
    def add(self, rows: Sequence[Row]) -> set[str]:
        """Insert rows not listed yet; return the addresses this call inserted."""
        ...

    def remove(self, address: str) -> bool:
        """Delete the row; whether there was one."""
        ...

    def totals(self) -> tuple[int, int, int]:
        """(chunks, raw bytes, stored bytes)."""
        ...

    def ages(self, grace_s: float) -> list[tuple[str, int, bool]]:
        """Every row as (address, stored_size, touched more than ``grace_s`` ago)."""
        ...

    def remove_stale(self, address: str, grace_s: float, then: Callable[[], None]) -> int | None:
        """Delete the row if it was touched more than ``grace_s`` ago, call ``then`` (the
        object's deletion) before committing, and return its stored size; None (and no
        call) when the row is gone or was touched since."""
        ...

    def close(self) -> None: ...


class PostgresChunkIndex:
    def __init__(self, url: str, timeout_s: float, pool_size: int = 8) -> None:
        self.location = redact_url(url)
        self._what = f"chunk index at {self.location}"
        self._pool = ConnectionPool(url, pool_size, timeout_s=timeout_s)
        with self._pool.session(self._what, write=True, slow=True) as conn:
            migrate_postgres(conn)

    def touch(self, addresses: Sequence[str]) -> dict[str, int]:
        if not addresses:
            return {}
        # The subquery locks the rows in address order (see the module docstring).
        sql = """
            UPDATE checkpoint_chunks c SET touched_at = now()
            FROM (SELECT address FROM checkpoint_chunks WHERE address = ANY(%s)
                  ORDER BY address FOR UPDATE) s
            WHERE c.address = s.address
            RETURNING c.address, c.stored_size"""
        with self._pool.session(self._what, write=True) as conn:
            return dict(conn.execute(sql, (list(addresses),)).fetchall())

    def listed(self, addresses: Sequence[str]) -> dict[str, int]:
        if not addresses:
            return {}
        sql = "SELECT address, stored_size FROM checkpoint_chunks WHERE address = ANY(%s)"
        with self._pool.session(self._what) as conn:
            return dict(conn.execute(sql, (list(addresses),)).fetchall())

    def add(self, rows: Sequence[Row]) -> set[str]:
        if not rows:
            return set()
        rows = sorted(rows)
        sql = """
            INSERT INTO checkpoint_chunks (address, size, stored_size)
            SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) ORDER BY 1
            ON CONFLICT (address) DO NOTHING
            RETURNING address"""
        columns = [list(column) for column in zip(*rows, strict=True)]
        with self._pool.session(self._what, write=True) as conn:
            return {r[0] for r in conn.execute(sql, columns).fetchall()}

    def remove(self, address: str) -> bool:
        sql = "DELETE FROM checkpoint_chunks WHERE address = %s"
        with self._pool.session(self._what, write=True) as conn:
            return conn.execute(sql, (address,)).rowcount > 0

    def totals(self) -> tuple[int, int, int]:
        sql = """SELECT count(*), coalesce(sum(size), 0), coalesce(sum(stored_size), 0)
                 FROM checkpoint_chunks"""
        with self._pool.session(self._what) as conn:
            count, size, stored = conn.execute(sql).fetchone()
        return int(count), int(size), int(stored)

    def ages(self, grace_s: float) -> list[tuple[str, int, bool]]:
        sql = """SELECT address, stored_size, touched_at < now() - make_interval(secs => %s)
                 FROM checkpoint_chunks"""
        with self._pool.session(self._what, slow=True) as conn:
            return [(a, int(s), bool(old)) for a, s, old in conn.execute(sql, (grace_s,))]

    def remove_stale(self, address: str, grace_s: float, then: Callable[[], None]) -> int | None:
        # The condition is in the DELETE itself: a touch committed since ages() wins.
        sql = """DELETE FROM checkpoint_chunks
                 WHERE address = %s AND touched_at < now() - make_interval(secs => %s)
                 RETURNING stored_size"""
        with self._pool.session(self._what, write=True) as conn, conn.transaction():
            rows = conn.execute(sql, (address, grace_s)).fetchall()  # all: ends the statement
            if rows:
                then()  # an error here rolls the DELETE back: row and object stay
        return int(rows[0][0]) if rows else None

    def close(self) -> None:
        self._pool.close()


# SQLite's "now" as Unix epoch seconds, like the column defaults of migration 005.
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"


class SqliteChunkIndex:
    def __init__(self, path: Path | str, timeout_s: float) -> None:
        self._file = SqliteFile(path, timeout_s)
        self.location = self._file.location
        self._what = f"chunk index at {self.location}"
        with self._file.session(self._what, write=True) as conn:
            migrate_sqlite(conn)

    @staticmethod
    def _marks(n: int) -> str:
        return ",".join("?" * n)

    def touch(self, addresses: Sequence[str]) -> dict[str, int]:
        if not addresses:
            return {}
        sql = (
            f"UPDATE checkpoint_chunks SET touched_at = {_NOW} "
            f"WHERE address IN ({self._marks(len(addresses))}) RETURNING address, stored_size"
        )
        with self._file.session(self._what, write=True) as conn, write_transaction(conn):
            return dict(conn.execute(sql, list(addresses)).fetchall())

    def listed(self, addresses: Sequence[str]) -> dict[str, int]:
        if not addresses:
            return {}
        sql = (
            "SELECT address, stored_size FROM checkpoint_chunks "
            f"WHERE address IN ({self._marks(len(addresses))})"
        )
        with self._file.session(self._what) as conn:
            return dict(conn.execute(sql, list(addresses)).fetchall())

    def add(self, rows: Sequence[Row]) -> set[str]:
        if not rows:
            return set()
        sql = (
            "INSERT INTO checkpoint_chunks (address, size, stored_size) VALUES (?, ?, ?) "
            "ON CONFLICT (address) DO NOTHING RETURNING address"
        )
        inserted = set()
        with self._file.session(self._what, write=True) as conn, write_transaction(conn):
            for row in sorted(rows):
                inserted.update(r[0] for r in conn.execute(sql, row).fetchall())
        return inserted

    def remove(self, address: str) -> bool:
        sql = "DELETE FROM checkpoint_chunks WHERE address = ?"
        with self._file.session(self._what, write=True) as conn:
            return conn.execute(sql, (address,)).rowcount > 0

    def totals(self) -> tuple[int, int, int]:
        sql = """SELECT count(*), coalesce(sum(size), 0), coalesce(sum(stored_size), 0)
                 FROM checkpoint_chunks"""
        with self._file.session(self._what) as conn:
            count, size, stored = conn.execute(sql).fetchone()
        return int(count), int(size), int(stored)

    def ages(self, grace_s: float) -> list[tuple[str, int, bool]]:
        sql = f"SELECT address, stored_size, touched_at < {_NOW} - ? FROM checkpoint_chunks"
        with self._file.session(self._what) as conn:
            return [(a, int(s), bool(old)) for a, s, old in conn.execute(sql, (grace_s,))]

    def remove_stale(self, address: str, grace_s: float, then: Callable[[], None]) -> int | None:
        sql = (
            "DELETE FROM checkpoint_chunks "
            f"WHERE address = ? AND touched_at < {_NOW} - ? RETURNING stored_size"
        )
        # BEGIN IMMEDIATE holds the write lock until the object is gone (see the module).
        with self._file.session(self._what, write=True) as conn, write_transaction(conn):
            rows = conn.execute(sql, (address, grace_s)).fetchall()  # all: ends the statement
            if rows:
                then()
        return int(rows[0][0]) if rows else None

    def close(self) -> None:
        self._file.close()
