"""SQLite plumbing shared by the L3 tier and the asset repository: per-thread
connections to one file (WAL, busy timeout), write transactions that take the
database's write lock up front, and one mapping of sqlite3 errors onto ours."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from esper_assets.errors import DurableWriteError, StorageError, TierUnavailable
from esper_assets.storage.db import Refine, raise_refined


@contextmanager
def sqlite_errors(what: str, write: bool, refine: Refine | None = None) -> Iterator[None]:
    """Turn sqlite3 errors into ours: OperationalError (locked past the busy timeout,
    file gone, disk I/O) -> TierUnavailable; any other refusal -> DurableWriteError for
    writes (nothing was stored), StorageError for reads. ``refine`` sees each error
    first and may name a more precise one (a unique violation -> a conflict, say)."""
    try:
        yield
    except sqlite3.Error as exc:
        raise_refined(exc, refine)
        if isinstance(exc, sqlite3.OperationalError):
            raise TierUnavailable(f"{what}: {exc}") from exc
        kind = DurableWriteError if write else StorageError
        raise kind(f"{what} refused the request: {exc}") from exc


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT on an autocommit connection. IMMEDIATE takes the
    database's write lock at once: writers are serialised, and none can fail halfway
    through on a lock another writer took after it began."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class SqliteFile:
    """One SQLite file shared by the threads of a process: each thread gets its own
    connection (cheap in SQLite; sharing one would need a lock), all of them in WAL
    mode with a busy timeout of ``timeout_s``, all closed by :meth:`close`.

    ``prepare`` runs once on each new connection (functions, pragmas of the caller).
    """

    def __init__(
        self,
        path: Path | str,
        timeout_s: float,
        prepare: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.location = f"sqlite:///{self.path}"
        self.timeout_s = timeout_s
        self._prepare = prepare
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    def thread_connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False
        )
        self._switch_to_wal(conn)
        # WAL + NORMAL survives a process crash; only an OS crash can lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        if self._prepare is not None:
            self._prepare(conn)
        with self._all_lock:
            self._all.append(conn)
        return conn

    def _switch_to_wal(self, conn: sqlite3.Connection) -> None:
        # Switching a fresh file to WAL while another process opens it can fail with
        # "database is locked" at once: SQLite does not call the busy handler here.
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError:
                if time.monotonic() >= deadline:
                    conn.close()
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        """Close every thread's connection; a thread's next call opens a fresh one."""
        with self._all_lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
        self._local = threading.local()
