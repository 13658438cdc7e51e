"""A frozen (SIGSTOPped) PostgreSQL or S3 endpoint must cost a bounded time per call.

The server's kernel still accepts connections and ACKs what we send, so only a
client-side deadline ends the wait. Every call made while a service is frozen must
come back (a hit from another tier, a miss, or TierUnavailable / DurableWriteError)
within twice the configured timeout; the slack below covers thread start-up on a
loaded machine. That bound is the only timing asserted here.

These tests start their own services as child processes (a private PostgreSQL cluster
for the session, a ``moto_server`` per test): freezing the shared ones would stall
every other test.
"""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from esper_assets.errors import DurableWriteError, StorageError, TierUnavailable
from esper_assets.storage import (
    AssetMetadata,
    AssetRepository,
    CacheConfig,
    PersistentKernelCache,
)
from esper_assets.storage.repository.backends import PostgresAssets
from esper_assets_tests.conftest import _service_missing  # root conftest's: skip, or fail in CI
from esper_assets_tests.frozen import (
    MotoProcess,
    Outcome,
    PrivatePostgres,
    bounded,
    find_moto_server,
    find_pg_bindir,
)

SLACK_S = 0.5
# Not lower: a fresh PostgreSQL connection may take 2 s to give up (psycopg's floor on
# connect_timeout), and an S3 PUT waits up to 1 s for "100 Continue" before its read
# timeout starts (botocore's fixed wait); with 1.5 s both stay inside 2x.
SQL_TIMEOUT_S = 1.5
S3_TIMEOUT_S = 1.5
REPO_TIMEOUT_S = inspect.signature(PostgresAssets).parameters["timeout_s"].default


def limit(timeout_s: float) -> float:
    return 2 * timeout_s + SLACK_S


def unavailable(outcome: Outcome, expected: object = None) -> None:
    """The call returned ``expected`` (a miss) or said the tier is unavailable."""
    if outcome.error is not None:
        assert isinstance(outcome.error, TierUnavailable), repr(outcome.error)
    else:
        assert outcome.value == expected


def new_id(what: str) -> str:
    return f"frozen-{what}-{uuid.uuid4().hex[:8]}"


# -- services -------------------------------------------------------------------------
@pytest.fixture(scope="session")
def private_pg() -> Iterator[PrivatePostgres]:
    bindir = find_pg_bindir()
    if bindir is None:
        _service_missing("PostgreSQL binaries (initdb, pg_ctl)", "not installed")
    server = PrivatePostgres(bindir)
    try:
        server.start()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        server.stop()
        _service_missing("a private PostgreSQL cluster", exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_moto(tmp_path: Path) -> Iterator[MotoProcess]:
    executable = find_moto_server()
    if executable is None:
        _service_missing("moto_server", "not installed")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = MotoProcess(executable, tmp_path)
    try:
        try:
            server.start()
        except (OSError, RuntimeError) as exc:
            _service_missing("a private moto_server", exc)
        yield server
    finally:
        server.stop()


# -- PostgreSQL -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.postgres
def test_frozen_postgres_cache_calls_return_within_twice_the_timeout(private_pg):
    config = {
        "postgres_url": private_pg.url,
        "sql_timeout_s": SQL_TIMEOUT_S,
        "l2_enabled": False,
        "l4_enabled": False,
        "access_flush_interval_s": 3600.0,
        # Let every call probe L3 instead of skipping it behind an open breaker, so
        # each one shows its own bound.
        "breaker_reset_s": 0.0,
    }
    writer = PersistentKernelCache(CacheConfig(**config))
    reader = PersistentKernelCache(CacheConfig(**config))
    try:
        stored = {new_id(name): f"value of {name}".encode() for name in ("solo", "shared", "many")}
        solo, shared, many = stored
        writer.put_many(stored)  # in L3; not in the reader's L1
        missing = new_id("missing")
        bound = limit(SQL_TIMEOUT_S)

        with private_pg.frozen():
            unavailable(bounded(lambda: reader.get(missing), bound, "get of a miss"))
            unavailable(bounded(lambda: reader.get(solo), bound, "get of an L3-only value"))

            # Single-flight: the followers wait for the leader, who must give up in time.
            outcomes: list[Outcome] = []
            threads_done = bounded(
                lambda: _concurrent_gets(reader, shared, 4, outcomes), bound, "4 gets of one id"
            )
            assert threads_done.error is None, repr(threads_done.error)
            assert len(outcomes) == 4
            for outcome in outcomes:
                unavailable(outcome)

            unavailable(
                bounded(lambda: reader.get_many([missing, many]), bound, "get_many"), expected={}
            )
            put = bounded(lambda: reader.put(new_id("put"), b"not stored"), bound, "put")
            assert isinstance(put.error, DurableWriteError), repr(put.error)

        # Thawed: the breaker lets the next call probe, and it succeeds.
        assert reader.get(solo) == stored[solo]
        assert reader.get_many([shared, many]) == {shared: stored[shared], many: stored[many]}
        after = new_id("after")
        reader.put(after, b"stored")
        assert writer.get(after) == b"stored"
    finally:
        reader.close()
        writer.close()


def _concurrent_gets(cache, kernel_id: str, n: int, outcomes: list[Outcome]) -> None:
    """``n`` threads get ``kernel_id`` at once; their outcomes are appended."""
    barrier = threading.Barrier(n)

    def one() -> None:
        outcome = Outcome()
        barrier.wait()
        try:
            outcome.value = cache.get(kernel_id)
        except BaseException as exc:
            outcome.error = exc
        outcomes.append(outcome)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.mark.slow
@pytest.mark.postgres
def test_frozen_postgres_repository_read_returns_within_twice_the_timeout(private_pg):
    repo = AssetRepository(private_pg.url, access_flush_interval_s=3600.0)
    try:
        asset_id = repo.create_asset(AssetMetadata("kernel", new_id("asset")), b"payload")
        with private_pg.frozen():
            read = bounded(lambda: repo.get_asset(asset_id), limit(REPO_TIMEOUT_S), "get_asset")
            assert isinstance(read.error, TierUnavailable), repr(read.error)
        _, data = repo.get_asset(asset_id)
        assert data == b"payload"
    finally:
        repo.close()


@pytest.mark.postgres
def test_pool_connection_settings_and_a_merely_slow_server(private_pg):
    from esper_assets.storage.db.postgres import ConnectionPool, postgres_errors

    def show(url: str, setting: str) -> str:
        pool = ConnectionPool(url, 1, timeout_s=SQL_TIMEOUT_S)
        try:
            with pool.connection() as conn:
                return conn.execute(f"SHOW {setting}").fetchone()[0]
        finally:
            pool.close()

    assert show(private_pg.url, "statement_timeout") == "1500ms"
    with_path = private_pg.url + "?options=-csearch_path%3Dfrozen_elsewhere"
    assert show(with_path, "search_path") == "frozen_elsewhere"
    assert show(with_path, "statement_timeout") == "1500ms"
    assert show(private_pg.url + "?options=-cstatement_timeout%3D5s", "statement_timeout") == "5s"

    # Client side, on the socket: a peer that stops ACKing is dropped after the timeout.
    pool = ConnectionPool(private_pg.url, 1, timeout_s=SQL_TIMEOUT_S)
    try:
        with (
            pool.connection() as conn,
            socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as sock,
        ):
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1500
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    finally:
        pool.close()

    # A live server that is merely slow answers with its own timeout error: reported as
    # refused (not unreachable), and the connection stays pooled. (The URL's own, shorter
    # statement_timeout keeps this far from the client deadline on a loaded machine.)
    pool = ConnectionPool(
        private_pg.url + "?options=-cstatement_timeout%3D200ms", 1, timeout_s=SQL_TIMEOUT_S
    )
    try:
        with pool.connection() as conn:
            backend = conn.info.backend_pid
        with (
            pytest.raises(StorageError) as refused,
            postgres_errors("slow", write=False),
            pool.connection() as conn,
        ):
            conn.execute("SELECT pg_sleep(%s)", (SQL_TIMEOUT_S * 2,))
        assert not isinstance(refused.value, TierUnavailable)
        assert "statement timeout" in str(refused.value)
        with pool.connection() as conn:
            assert conn.info.backend_pid == backend
    finally:
        pool.close()


# -- S3 -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.s3
def test_frozen_s3_large_values_return_within_twice_the_timeout(private_moto, tmp_path):
    from esper_assets.storage.objects import make_s3_client

    bucket = f"esper-frozen-{uuid.uuid4().hex[:8]}"
    make_s3_client(private_moto.endpoint).create_bucket(Bucket=bucket)
    config = {
        "sqlite_path": str(tmp_path / "l3.db"),
        "l2_enabled": False,
        "s3_bucket": bucket,
        "s3_endpoint_url": private_moto.endpoint,
        "object_store_timeout_s": S3_TIMEOUT_S,
        "large_object_threshold": 4096,  # values above it live in L4 only
        "breaker_reset_s": 0.0,
        "access_flush_interval_s": 3600.0,
    }
    writer = PersistentKernelCache(CacheConfig(**config))
    reader = PersistentKernelCache(CacheConfig(**config))
    try:
        large_id, large = new_id("large"), os.urandom(64 << 10)
        writer.put(large_id, large)
        bound = limit(S3_TIMEOUT_S)
        with private_moto.frozen():
            unavailable(bounded(lambda: reader.get(large_id), bound, "L4 get of a large value"))
            put = bounded(lambda: reader.put(new_id("put"), os.urandom(64 << 10)), bound, "put")
            assert isinstance(put.error, DurableWriteError), repr(put.error)
        assert reader.get(large_id) == large
    finally:
        reader.close()
        writer.close()
