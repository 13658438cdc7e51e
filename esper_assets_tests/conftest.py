"""Shared fixtures: real PostgreSQL, Redis and an S3 HTTP endpoint (moto's server).

Services come from ESPER_TEST_DATABASE_URL / ESPER_TEST_REDIS_URL (loopback by
default). Each test gets its own PostgreSQL schema, Redis key prefix and S3
bucket. Under CI=true a missing service fails the run; locally it skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from esper_assets.storage import CacheConfig, PersistentKernelCache

PG_URL = os.environ.get("ESPER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ESPER_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _service_missing(what: str, why: object) -> None:
    message = f"{what} is not reachable ({why})"
    if IN_CI:
        pytest.fail(f"{message}; CI=true requires every service", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused at once)."""
    return free_port()


class OpenThings:
    """What a test's factories (make_cache, make_repo) opened; each closed once, newest first.

    The fixtures of the services those things live on (``pg_url``, ``redis_prefix``)
    call :meth:`close_all` before they drop their schema or delete their keys, so the
    services always outlive what was built on them, whatever order a test asked for
    its fixtures in (a lazily requested ``pg_url`` is torn down *before* the factory
    that requested it). An error from ``close()`` is raised after the rest are closed:
    it fails the test instead of being swallowed.
    """

    def __init__(self) -> None:
        self._open: list = []

    def add(self, thing):
        self._open.append(thing)
        return thing

    def close_all(self) -> None:
        errors: list[Exception] = []
        while self._open:
            thing = self._open.pop()
            try:
                thing.close()
            except Exception as exc:  # close the others too, then report every failure
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup("closing what the test opened failed", errors)


@pytest.fixture
def open_things() -> Iterator[OpenThings]:
    things = OpenThings()
    yield things
    things.close_all()


# -- PostgreSQL -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def pg_server_url() -> str:
    import psycopg

    try:
        with psycopg.connect(PG_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        _service_missing(f"PostgreSQL at {PG_URL}", exc)
    return PG_URL


def with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture
def pg_url(pg_server_url: str, open_things: OpenThings) -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped afterwards (after the
    caches and repositories the test built are closed)."""
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    yield with_search_path(pg_server_url, schema)
    try:
        open_things.close_all()
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


# -- Redis ----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_server_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        _service_missing(f"Redis at {REDIS_URL}", exc)
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_server_url: str, open_things: OpenThings) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (after the
    caches the test built are closed, so none writes behind the clean-up)."""
    prefix = f"esper:test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    try:
        open_things.close_all()
    finally:
        _delete_keys(redis_server_url, prefix)


def _delete_keys(redis_server_url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_server_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


class RedisProcess:
    """A private redis-server on a free port, for tests that kill and restart it."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.tmp),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path, open_things: OpenThings) -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        _service_missing("redis-server binary", "not on PATH")
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    try:
        open_things.close_all()  # the caches on it first, while it still answers
    finally:
        server.stop()


# -- the embedded default ---------------------------------------------------------------
@pytest.fixture
def esper_home(tmp_path: Path, monkeypatch) -> Path:
    """A fresh ESPER_HOME with every service variable unset: the embedded default."""
    from esper_assets.settings import SERVICE_VARIABLES

    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ESPER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# -- S3 (moto's HTTP server) -----------------------------------------------------------------
@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        _service_missing("moto[server]", exc)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    from esper_assets.storage.object_store import make_s3_client

    bucket = f"esper-test-{uuid.uuid4().hex[:12]}"
    make_s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    return bucket


# -- caches ---------------------------------------------------------------------------
BACKENDS = ["embedded", "services"]


@pytest.fixture
def make_cache(
    request, tmp_path: Path, open_things: OpenThings
) -> Iterator[Callable[..., PersistentKernelCache]]:
    """Build caches on a backend; ``make_cache(backend, **config_overrides)``.

    ``embedded``: SQLite file + directory, no L2. ``services``: PostgreSQL (own
    schema) + Redis (own prefix) + S3 over HTTP (own bucket). Closed afterwards,
    before the schema is dropped; an error from ``close()`` fails the test.
    """

    def build(backend: str = "embedded", **overrides) -> PersistentKernelCache:
        if backend == "embedded":
            base = {
                "sqlite_path": str(tmp_path / "l3.sqlite3"),
                "object_store_path": str(tmp_path / "objects"),
            }
        elif backend == "services":
            base = {
                "postgres_url": request.getfixturevalue("pg_url"),
                "redis_url": request.getfixturevalue("redis_server_url"),
                "redis_prefix": request.getfixturevalue("redis_prefix"),
                "s3_bucket": request.getfixturevalue("s3_bucket"),
                "s3_endpoint_url": request.getfixturevalue("s3_endpoint"),
            }
        else:
            raise ValueError(backend)
        return open_things.add(PersistentKernelCache(CacheConfig(**{**base, **overrides})))

    yield build
    open_things.close_all()


# -- additions for the kernel-cache integration tests --------------------------------
def with_pg_options(url: str, *settings: str) -> str:
    """``url`` with more ``-c name=value`` settings merged into its single ``options``.

    libpq keeps only the last of repeated ``options`` parameters, so appending a
    second ``options=`` to a :func:`with_search_path` URL would silently drop the
    search_path (and the test would run in ``public``). Merge instead.
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = [v for k, v in query if k == "options"] + list(settings)
    query = [(k, v) for k, v in query if k != "options"] + [("options", " ".join(options))]
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@pytest.fixture
def pg_readonly_url(pg_url: str) -> str:
    """``pg_url`` (same schema) whose sessions refuse every write.

    Build a normal cache on ``pg_url`` first: it applies the migrations.
    """
    return with_pg_options(pg_url, "-cdefault_transaction_read_only=on")


@pytest.fixture
def redis_client(redis_server_url: str) -> Iterator:
    """A plain client on the shared Redis, for looking at a cache's keys directly."""
    import redis

    client = redis.Redis.from_url(redis_server_url)
    yield client
    client.close()


class ManualClock:
    """Stands in for the ``time`` module of one of our modules: ``monotonic()`` moves
    only when the test calls :meth:`advance`; everything else is the real module."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name: str):
        return getattr(time, name)


@pytest.fixture
def l1_clock(monkeypatch) -> ManualClock:
    """The clock L1 (esper_assets.storage.memory) reads TTLs from, moved by the test alone,
    so TTL tests say "after the TTL" or "before it" without sleeping or racing."""
    from esper_assets.storage import memory

    clock = ManualClock()
    monkeypatch.setattr(memory, "time", clock)
    return clock


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``condition`` every 50 ms until it is true; fail naming ``what`` after ``timeout_s``.

    For effects that happen "soon" (TTL expiry, background flushes, pub/sub):
    bounded polling instead of a fixed sleep or an assertion on elapsed time.
    """
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


# -- asset repository ---------------------------------------------------------------------
ASSET_BACKENDS = ["sqlite", "postgres"]


@pytest.fixture
def make_repo(request, tmp_path: Path, open_things: OpenThings) -> Iterator[Callable[..., object]]:
    """Build AssetRepositories; ``make_repo(backend, **overrides)``.

    ``sqlite``: SQLite file + DirectoryObjectStore under ``tmp_path``. ``postgres``:
    this test's own schema + S3 over HTTP (moto, own bucket, prefix ``esper``).
    Every call on one backend opens the *same* database and object store, so a
    second repository sees what the first one committed. ``make_repo.store(backend)``
    is a separate ObjectStore on the same location, for looking at objects directly.
    All repositories are closed afterwards (closing twice is fine), before the schema
    is dropped; an error from ``close()`` fails the test.
    """
    from esper_assets.storage import AssetRepository
    from esper_assets.storage.object_store import (
        DirectoryObjectStore,
        S3ObjectStore,
        make_s3_client,
    )

    def store(backend: str = "sqlite"):
        if backend == "sqlite":
            return DirectoryObjectStore(tmp_path / "objects")
        if backend == "postgres":
            client = make_s3_client(request.getfixturevalue("s3_endpoint"))
            return S3ObjectStore(client, request.getfixturevalue("s3_bucket"), "esper")
        raise ValueError(backend)

    def build(backend: str = "sqlite", **overrides):
        if backend == "sqlite":
            base = {"sqlite_path": str(tmp_path / "assets.sqlite3")}
        elif backend == "postgres":
            base = {"postgres_url": request.getfixturevalue("pg_url")}
        else:
            raise ValueError(backend)
        base["object_store"] = store(backend)
        return open_things.add(AssetRepository(**{**base, **overrides}))

    build.store = store
    yield build
    open_things.close_all()
