"""PostgreSQL plumbing shared by the L3 tier and the asset repository: one pool of
connections and one mapping of psycopg errors onto ours."""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from esper_assets.errors import DurableWriteError, StorageError, TierUnavailable
from esper_assets.storage.db import Refine, raise_refined


def is_connection_error(exc: Exception) -> bool:
    """A psycopg error meaning the server could not be reached or went away, as opposed
    to one it answered with (out of memory, read-only, constraint...), which says
    nothing about the tier's health and must not read as "unreachable"."""
    import psycopg

    state = getattr(exc, "sqlstate", None)
    if state is None:  # raised by the client: no connection, connection lost, timeout
        return isinstance(exc, psycopg.OperationalError)
    return state.startswith(("08", "57P"))  # connection exception; admin/crash shutdown


@contextmanager
def postgres_errors(what: str, write: bool, refine: Refine | None = None) -> Iterator[None]:
    """Turn psycopg errors into ours: unreachable -> TierUnavailable; refused ->
    DurableWriteError for writes (nothing was stored), StorageError for reads.
    ``refine`` sees each error first and may name a more precise one."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        raise_refined(exc, refine)
        if is_connection_error(exc):
            raise TierUnavailable(f"{what} is unreachable: {exc}") from exc
        kind = DurableWriteError if write else StorageError
        raise kind(f"{what} refused the request: {exc}") from exc


# How long maintenance may take (migrations, cleanup, bulk loads, ANALYZE), where every
# other call gets timeout_s: over millions of rows such work is slow, not a dead server.
SLOW_WORK_S = 600.0

# The client deadline trails statement_timeout a little, so that a live server that is
# merely slow answers first with its own error (57014) and the connection survives.
_CLIENT_GRACE = 1.2


@cache
def _deadline_connection() -> type:
    """psycopg.Connection whose every round trip has a client-side deadline.

    psycopg 3 has no per-query client timeout: its wait loop takes one (``notifies()``
    and ``connect()`` use it) but cursors, transactions and COPY call
    ``Connection.wait(gen)`` without it, so a server that accepts bytes and never
    answers blocks them forever. This subclass passes ``deadline_s`` instead. Past it
    the connection is closed (its state is unknown: a command is in flight) and the
    call raises OperationalError; the pool then drops the closed connection.

    ``Connection.wait`` is not in psycopg's documented API, but every round trip of
    psycopg 3.3 goes through it; test_frozen_services.py fails if that stops holding.
    """
    import psycopg
    from psycopg import errors
    from psycopg.pq import ConnStatus

    # What psycopg's wait raises at its deadline (a private OperationalError subclass).
    deadline_passed = getattr(errors, "_WaitTimeout", psycopg.OperationalError)
    base_wait = psycopg.Connection.wait  # not super(): this runs once per round trip

    class DeadlineConnection(psycopg.Connection):
        deadline_s: float | None = None

        # interval: psycopg's own default; timeout: given only by notifies(), kept.
        def wait(self, gen, interval: float = 0.1, timeout: float | None = None):
            if timeout is not None or self.deadline_s is None:
                return base_wait(self, gen, interval, timeout)
            try:
                return base_wait(self, gen, interval, self.deadline_s)
            except deadline_passed as exc:
                if exc.sqlstate is not None or self.pgconn.status != ConnStatus.OK:
                    raise  # the server answered, or the connection is already gone
                self.close()
                raise psycopg.OperationalError(
                    f"no answer from the server within {self.deadline_s:g}s; connection closed"
                ) from exc

    return DeadlineConnection


@contextmanager
def lock_wait(conn, seconds: float) -> Iterator[None]:
    """Let the statements inside wait up to ``seconds`` for a lock another writer holds
    (a bulk load holds the repository's writers' lock while its COPY runs): a wait
    for a lock is a busy server, not a dead one. Only the client deadline moves."""
    saved = getattr(conn, "deadline_s", None)
    if saved is not None:
        conn.deadline_s = max(saved, seconds * _CLIENT_GRACE)
    try:
        yield
    finally:
        if saved is not None:
            conn.deadline_s = saved


class ConnectionPool:
    """Idle psycopg connections, reused last-in first-out.

    Why not psycopg_pool: its checkout and return cost ~20 us here, a third of a
    point SELECT on loopback, and the L3 target is 1.3x a raw prepared SELECT.
    This pool is a deque (atomic append/pop) and a health check on return: a
    broken connection is dropped and the next caller opens a fresh one, so a
    restarted server costs one failed call per idle connection at most.

    ``timeout_s`` bounds each call, also against a frozen server (SIGSTOPped, stuck)
    whose kernel still accepts and ACKs our bytes, so that no TCP setting fires and
    the server's own timeouts cannot run:

    - client side, each round trip (one statement, one ``executemany`` pipeline, one
      COPY block, BEGIN/COMMIT) must be answered within ``timeout_s`` (+20%), else the
      connection is closed and the call raises OperationalError, which
      :func:`postgres_errors` maps to TierUnavailable. It costs one Python call per
      round trip: no thread, no registry;
    - server side, when ``statement_timeout`` is true: ``statement_timeout`` =
      ``timeout_s`` (lock waits included), so a live server that is merely slow
      answers first, with an error that reads as "refused", not "unreachable", and
      the connection survives. Leave it off for connections that COPY: a COPY is one
      statement that lasts as long as the client streams rows;
    - ``connect_timeout`` = ``timeout_s`` whole seconds, at least 2 (libpq's and
      psycopg's floor), so a fresh connection to a frozen server costs up to 2 s
      even when ``timeout_s`` is smaller;
    - TCP keepalives and ``tcp_user_timeout`` = ``timeout_s``, for a peer that is gone
      (its kernel no longer ACKs) while a connection sat idle or was sending.

    Settings the URL names itself are left to the URL; a statement_timeout in its
    ``options`` wins over ours. ``timeout_s=None``: none of this.
    """

    def __init__(
        self,
        url: str,
        max_idle: int,
        timeout_s: float | None = None,
        statement_timeout: bool = True,
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        self.max_idle = max_idle
        self.timeout_s = timeout_s
        self._kwargs = {"autocommit": True, "prepare_threshold": 0}
        if timeout_s is not None:
            self._kwargs |= _timeout_settings(url, timeout_s, statement_timeout)
        self._kwargs |= connect_kwargs
        self._deadline = None if timeout_s is None else timeout_s * _CLIENT_GRACE
        self._idle: deque = deque()

    def _connect(self):
        conn = _deadline_connection().connect(self.url, **self._kwargs)
        conn.deadline_s = self._deadline
        return conn

    @contextmanager
    def connection(self, patience_s: float | None = None) -> Iterator[Any]:
        """A pooled connection. ``patience_s``: for work known to be slow (migrations,
        cleanup, bulk loads, ANALYZE), its statements and round trips may take that
        long instead of ``timeout_s``; a frozen server still cannot hold it forever."""
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = self._connect()
        if patience_s is not None and self._deadline is not None:
            conn.deadline_s = patience_s * _CLIENT_GRACE
            conn.execute(f"SET statement_timeout = {max(1, round(patience_s * 1000))}")
        try:
            yield conn
        finally:
            if conn.deadline_s != self._deadline and not (conn.closed or conn.broken):
                conn.deadline_s = self._deadline
                conn.execute("RESET statement_timeout")  # back to the connection's own
            if conn.closed or conn.broken or len(self._idle) >= self.max_idle:
                conn.close()
            else:
                self._idle.append(conn)

    @contextmanager
    def session(
        self, what: str, write: bool = False, slow: bool = False, refine: Refine | None = None
    ) -> Iterator[Any]:
        """A pooled connection whose psycopg errors come out as ours, naming ``what``
        (see :func:`postgres_errors`). ``slow``: maintenance (migrations, cleanup, bulk
        loads, ANALYZE) may take SLOW_WORK_S instead of ``timeout_s``."""
        with (
            postgres_errors(what, write, refine),
            self.connection(SLOW_WORK_S if slow else None) as conn,
        ):
            yield conn

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _timeout_settings(url: str, timeout_s: float, statement_timeout: bool) -> dict[str, Any]:
    """Connection parameters bounding a connection by ``timeout_s``; those the URL
    names itself are not overridden."""
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    whole_s = max(1, math.ceil(timeout_s))
    settings: dict[str, Any] = {
        "connect_timeout": max(2, int(timeout_s)),
        "keepalives": 1,
        "keepalives_idle": whole_s,
        "keepalives_interval": whole_s,
        "keepalives_count": 3,
        "tcp_user_timeout": max(1, round(timeout_s * 1000)),
    }
    settings = {k: v for k, v in settings.items() if k not in given}
    if statement_timeout:
        # Ours first: a later -c statement_timeout (the URL's, or PGOPTIONS') wins.
        options = given.get("options", os.environ.get("PGOPTIONS", ""))
        ours = f"-c statement_timeout={max(1, round(timeout_s * 1000))}"
        settings["options"] = f"{ours} {options}".strip()
    return settings
