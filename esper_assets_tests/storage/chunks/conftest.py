"""Fixtures of the chunk store's tests: one suite, two backends.

``sqlite``: a SQLite index + a directory object store under ``tmp_path``.
``postgres``: this test's own PostgreSQL schema + a bucket on moto's HTTP S3 server
(prefix ``esper``). Nothing is mocked. ``make_chunks()`` builds ChunkStores on the
same index and objects (a second one shares no memory with the first);
``raw_store`` is a separate ObjectStore on the same location, through which tests
look at, damage or delete objects.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from esper_assets.storage.chunks import ChunkStore
from esper_assets.storage.objects import (
    DirectoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    make_s3_client,
)

BACKENDS = [
    pytest.param("sqlite"),
    pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.s3]),
]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def raw_store(request, backend: str, tmp_path: Path) -> ObjectStore:
    if backend == "sqlite":
        return DirectoryObjectStore(tmp_path / "objects")
    client = make_s3_client(request.getfixturevalue("s3_endpoint"))
    return S3ObjectStore(client, request.getfixturevalue("s3_bucket"), "esper")


@pytest.fixture
def make_chunks(
    request, backend: str, raw_store: ObjectStore, tmp_path: Path, open_things
) -> Iterator[Callable[..., ChunkStore]]:
    """``make_chunks(store=None, **options)``: a ChunkStore on this test's index and
    objects (``store``: another ObjectStore in front of them, e.g. a faulty one)."""

    def build(store: ObjectStore | None = None, **options) -> ChunkStore:
        if backend == "sqlite":
            options.setdefault("sqlite_path", str(tmp_path / "chunks.sqlite3"))
        else:
            options.setdefault("postgres_url", request.getfixturevalue("pg_url"))
        return open_things.add(ChunkStore(store or raw_store, **options))

    yield build
    open_things.close_all()


@pytest.fixture
def chunks(make_chunks) -> ChunkStore:
    return make_chunks()


@pytest.fixture
def index_rows(request, backend: str, tmp_path: Path, chunks) -> Callable[[str], list[tuple]]:
    """Run a query on the chunk index's database directly (after ``chunks`` migrated it)."""

    def query(sql: str) -> list[tuple]:
        if backend == "sqlite":
            with closing(sqlite3.connect(tmp_path / "chunks.sqlite3")) as conn, conn:
                cursor = conn.execute(sql)
                return cursor.fetchall() if cursor.description else []
        import psycopg

        with psycopg.connect(request.getfixturevalue("pg_url")) as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description else []

    return query


def stored_keys(store: ObjectStore) -> list[str]:
    return sorted(key for key, _, _ in store.list("chunks/"))
