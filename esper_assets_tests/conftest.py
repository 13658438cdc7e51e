"""Shared fixtures: real PostgreSQL, Redis and an S3 HTTP endpoint (moto's server).

Services come from ESPER_TEST_DATABASE_URL / ESPER_TEST_REDIS_URL (loopback by
default). Each test gets its own PostgreSQL schema, Redis key prefix and S3
bucket. Under CI=true a missing service fails the run; locally it skips.

Every test is marked ``postgres`` / ``redis`` / ``s3`` by what it uses (see
:func:`pytest_collection_modifyitems`), so ``-m "not postgres and not redis and not s3"``
runs the tests that need nothing but this virtualenv.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
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
def pg_url(request, pg_server_url: str, open_things: OpenThings) -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped afterwards (after the
    caches and repositories the test built are closed)."""
    import psycopg

    require_marks(request)
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
def redis_prefix(request, redis_server_url: str, open_things: OpenThings) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (after the
    caches the test built are closed, so none writes behind the clean-up)."""
    require_marks(request)
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
        self.bus_port = free_port()  # used only as a cluster node
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, cluster: bool = False) -> None:
        import redis

        # A cluster node keeps its identity and slots in nodes.conf under --dir; its bus
        # port is a free port of its own (the default, port + 10000, may be taken or > 65535).
        as_node = ["--cluster-enabled", "yes", "--cluster-port", str(self.bus_port),
                   "--cluster-node-timeout", "1000",
                   "--cluster-require-full-coverage", "no"] if cluster else []  # fmt: skip
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
                *as_node,
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
def private_redis(request, tmp_path: Path, open_things: OpenThings) -> Iterator[RedisProcess]:
    require_marks(request)
    if shutil.which("redis-server") is None:
        _service_missing("redis-server binary", "not on PATH")
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    try:
        open_things.close_all()  # the caches on it first, while it still answers
    finally:
        server.stop()


# -- a Redis Cluster of three nodes -------------------------------------------------------
class RedisClusterProcesses:
    """Three ``redis-server --cluster-enabled yes`` primaries on free loopback ports, no
    replicas, each owning a third of the hash slots; ``url`` names them all.

    Built with redis-py's CLUSTER ADDSLOTSRANGE and CLUSTER MEET (no redis-cli needed).
    ``cluster-require-full-coverage no``: with a node down the others keep serving their
    slots, the behaviour a cache wants. A node restarts on its port with its nodes.conf,
    so it rejoins owning the same slots (empty: nothing is saved)."""

    NODES = 3

    def __init__(self, tmp: Path) -> None:
        self.nodes = [RedisProcess(tmp / f"node-{i}") for i in range(self.NODES)]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        import redis

        for node in self.nodes:
            node.tmp.mkdir(parents=True, exist_ok=True)
            node.start(cluster=True)
        per_node = 16384 // self.NODES
        for i, node in enumerate(self.nodes):
            last = 16383 if i == self.NODES - 1 else (i + 1) * per_node - 1
            with redis.Redis(port=node.port) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per_node, last)
        with redis.Redis(port=self.nodes[0].port) as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port, node.bus_port)
        self.wait_ok()

    def wait_ok(self, timeout_s: float = 20) -> None:
        """Until every node says cluster_state:ok and knows every other node."""
        import redis

        def ok(node: RedisProcess) -> bool:
            with redis.Redis(port=node.port, socket_timeout=1) as client:
                info = client.execute_command("CLUSTER", "INFO")
                if isinstance(info, bytes):
                    info = info.decode()
                known = client.execute_command("CLUSTER", "NODES")
                if isinstance(known, bytes):
                    known = known.decode()
                return "cluster_state:ok" in str(info) and str(known).count("connected") == (
                    self.NODES
                )

        wait_until(lambda: all(map(ok, self.nodes)), "the Redis Cluster to be ok", timeout_s)

    def restart(self, node: RedisProcess) -> None:
        node.start(cluster=True)
        self.wait_ok()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _start_cluster(tmp: Path) -> RedisClusterProcesses:
    if shutil.which("redis-server") is None:
        _service_missing("redis-server binary (for a Redis Cluster)", "not on PATH")
    cluster = RedisClusterProcesses(tmp)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory) -> Iterator[RedisClusterProcesses]:
    """One three-node cluster for the session's tests (each uses its own key prefix)."""
    cluster = _start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(request, redis_cluster: RedisClusterProcesses, open_things) -> Iterator[str]:
    require_marks(request)
    yield redis_cluster.url
    open_things.close_all()  # the caches on it first


@pytest.fixture
def private_redis_cluster(
    request, tmp_path: Path, open_things: OpenThings
) -> Iterator[RedisClusterProcesses]:
    """A cluster of this test's own, for tests that kill and restart its nodes."""
    require_marks(request)
    cluster = _start_cluster(tmp_path / "cluster")
    yield cluster
    try:
        open_things.close_all()
    finally:
        cluster.stop()


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
def s3_bucket(request, s3_endpoint: str) -> str:
    from esper_assets.storage.objects import make_s3_client

    require_marks(request)
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
def redis_client(request, redis_server_url: str) -> Iterator:
    """A plain client on the shared Redis, for looking at a cache's keys directly."""
    import redis

    require_marks(request)
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
    """The clock L1 (esper_assets.storage.cache.tiers.memory) reads TTLs from, moved by the test alone,
    so TTL tests say "after the TTL" or "before it" without sleeping or racing."""
    from esper_assets.storage.cache.tiers import memory

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
    from esper_assets.storage.objects import (
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


# -- markers: what each test needs, from what it uses -------------------------------------
# Fixtures that reach a service (``item.fixturenames`` is transitive: a test using
# ``other_process`` lists ``pg_url`` and ``pg_server_url`` too). The ``private_*``
# fixtures start their own server as a child process, so they need its binary (or
# moto's server) rather than the shared service: a user without redis-server or
# PostgreSQL's binaries deselects them with the same ``-m "not redis"`` / ``-m "not
# postgres"``, and one who has the shared services but not the binaries with ``-m "not
# private_services"``.
FIXTURE_MARKS: dict[str, frozenset[str]] = {
    "pg_server_url": frozenset({"postgres"}),
    "pg_url": frozenset({"postgres"}),
    "pg_readonly_url": frozenset({"postgres"}),
    "private_pg": frozenset({"postgres", "private_services"}),
    "redis_server_url": frozenset({"redis"}),
    "redis_prefix": frozenset({"redis"}),
    "redis_client": frozenset({"redis"}),
    "private_redis": frozenset({"redis", "private_services"}),
    "redis_cluster_url": frozenset({"redis", "private_services"}),
    "private_redis_cluster": frozenset({"redis", "private_services"}),
    "s3_endpoint": frozenset({"s3"}),
    "s3_bucket": frozenset({"s3"}),
    "private_moto": frozenset({"s3", "private_services"}),
}

# Backend names, as BACKENDS / ASSET_BACKENDS and the tests' own fixtures spell them, and
# the services a backend of that name is built on: ``make_cache("services")`` uses all
# three; ``make_repo("postgres")`` PostgreSQL and S3; a fixture choosing ``"postgres"``
# (L3, migrations) PostgreSQL; the ``"s3"`` landing S3. ``"embedded"``, ``"sqlite"`` and
# ``"directory"`` need none.
BACKEND_MARKS: dict[str, frozenset[str]] = {
    "services": frozenset({"postgres", "redis", "s3"}),
    "postgres": frozenset({"postgres"}),
    "s3": frozenset({"s3"}),
}
FACTORY_BACKEND_MARKS: dict[str, dict[str, frozenset[str]]] = {
    "make_cache": {"services": BACKEND_MARKS["services"]},
    "make_repo": {"postgres": frozenset({"postgres", "s3"})},
}
# A literal backend in the test's own code: ``make_cache("services", ...)``.
_LITERAL_BACKEND = re.compile(r"\b(make_cache|make_repo)\(\s*[\"']([a-z0-9_]+)[\"']")


def _direct_params(item: pytest.Item) -> set[str]:
    """Argument names given by ``@pytest.mark.parametrize`` (not by a fixture's ``params``)."""
    names: set[str] = set()
    for mark in item.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = argnames.split(",")
        names.update(name.strip() for name in argnames)
    return names


def _source(function: object) -> str:
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return ""


def marks_for(item: pytest.Item) -> set[str]:
    """The service markers ``item`` needs: by fixture, by backend parameter, by literal."""
    names = set(getattr(item, "fixturenames", ()))
    factories = names & FACTORY_BACKEND_MARKS.keys()
    needed: set[str] = set()
    for name in names & FIXTURE_MARKS.keys():
        needed |= FIXTURE_MARKS[name]

    def backend(value: object) -> None:
        if not isinstance(value, str):
            return
        needed.update(BACKEND_MARKS.get(value, ()))
        for factory in factories:
            needed.update(FACTORY_BACKEND_MARKS[factory].get(value, ()))

    callspec = getattr(item, "callspec", None)
    if callspec is not None:
        direct = _direct_params(item)
        for argname, value in callspec.params.items():
            # A fixture's own param picks its backend (l3_choice, db, landing, backend);
            # a directly parametrized value is a backend only if a factory takes it.
            if argname not in direct or factories:
                backend(value)
    if factories:
        for factory, value in _LITERAL_BACKEND.findall(_source(getattr(item, "function", None))):
            if factory in factories:
                backend(value)
    return needed


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these markers
def pytest_collection_modifyitems(config: pytest.Config, items: Iterable[pytest.Item]) -> None:
    for item in items:
        have = {mark.name for mark in item.iter_markers()}
        for name in sorted(marks_for(item) - have):
            item.add_marker(name)


def require_marks(request: pytest.FixtureRequest) -> None:
    """Keep the marking honest; called first by each per-test service fixture.

    A test that reaches a service at run time (``request.getfixturevalue``, a helper, a
    backend name) without that service's marker fails here, whether or not the service
    is up, so ``-m "not postgres"`` cannot let it through to a skip or a failure on a
    machine without PostgreSQL. (Inside the fixture, not in a ``pytest_fixture_setup``
    hook: pytest records a fixture's own error properly, a hook's leaves it half set up.)
    """
    item = request.node
    missing = FIXTURE_MARKS[request.fixturename] - {mark.name for mark in item.iter_markers()}
    if missing:
        pytest.fail(
            f"{item.nodeid} reaches {request.fixturename!r} but is not marked "
            f"{', '.join(sorted(missing))}: add the marker, or teach conftest.marks_for "
            "how to see it",
            pytrace=False,
        )
