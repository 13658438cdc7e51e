"""Fixtures and helpers shared by the asset repository's tests.

One suite, two backends: ``sqlite`` (SQLite file + DirectoryObjectStore) and
``postgres`` (a fresh PostgreSQL schema + S3 over HTTP served by moto). Nothing is
mocked. A small ``large_object_threshold`` makes both inline and object-store data
appear; a huge ``access_flush_interval_s`` makes access counts reach the database
only through ``flush_access()`` / ``close()`` unless a test asks otherwise.

Objects are inspected through a second ObjectStore on the same location; rows that
must (not) have reached the database are read through a second AssetRepository on
the same database, which shares no memory with the first.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from datetime import datetime, timedelta

import pytest

from esper_assets.storage.repository import AssetMetadata, AssetQuery, AssetRepository
from esper_assets_tests.conftest import ASSET_BACKENDS

THRESHOLD = 1024
MAX_BYTES = 64 * 1024
REPO_OPTIONS = {
    "large_object_threshold": THRESHOLD,
    "max_asset_bytes": MAX_BYTES,
    "access_flush_interval_s": 3600.0,
}
TICK = 0.02  # between creates whose created_at must differ (ordering, not timing)


@pytest.fixture(params=ASSET_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def repo(make_repo, backend) -> AssetRepository:
    return make_repo(backend, **REPO_OPTIONS)


@pytest.fixture
def other(make_repo, backend, repo) -> AssetRepository:
    """A second repository on the same database and object store (no shared memory)."""
    return make_repo(backend, **REPO_OPTIONS)


@pytest.fixture
def store(make_repo, backend):
    return make_repo.store(backend)


_seeds = itertools.count(1)


def blob(n: int = 64) -> bytes:
    """Fresh random bytes: never equal to any other blob() of the session."""
    return random.Random(next(_seeds)).randbytes(n)


def meta(name: str = "asset", asset_type: str = "kernel", **fields) -> AssetMetadata:
    return AssetMetadata(asset_type=asset_type, name=name, **fields)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def everything(repo: AssetRepository) -> list[AssetMetadata]:
    return repo.search_assets(AssetQuery().include_expired().limit(10000))


def count(repo: AssetRepository) -> int:
    return len(everything(repo))


def ids(results) -> list[str]:
    return [m.asset_id for m in results]


def found(repo: AssetRepository, query: AssetQuery) -> set[str]:
    results = ids(repo.search_assets(query))
    assert len(results) == len(set(results)), f"duplicate rows in {results}"
    return set(results)


def objects(store, prefix: str = "") -> dict[str, int]:
    return {entry[0]: entry[1] for entry in store.list(prefix)}


def events(repo: AssetRepository, asset_id: str) -> list[str]:
    return [e["event"] for e in repo.get_audit_log(asset_id)]


def midpoint(a: datetime, b: datetime) -> datetime:
    assert a < b, f"created_at values must differ: {a} !< {b}"
    return a + (b - a) / 2


def is_utc(dt: datetime | None) -> bool:
    return dt is not None and dt.tzinfo is not None and dt.utcoffset() == timedelta(0)


def create_spaced(repo: AssetRepository, *specs: tuple[AssetMetadata, bytes]) -> list[str]:
    """Create assets one after the other with strictly increasing created_at."""
    created = []
    for m, data in specs:
        if created:
            time.sleep(TICK)
        created.append(repo.create_asset(m, data))
    return created
