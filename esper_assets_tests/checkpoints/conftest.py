"""Checkpoint stores on both backends: ``sqlite`` (SQLite file + directory, the
embedded default) and ``postgres`` (this test's PostgreSQL schema + moto's S3)."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from esper_assets.checkpoints import CheckpointStore
from esper_assets.storage.chunks import ChunkStore
from esper_assets_tests.conftest import ASSET_BACKENDS


@pytest.fixture(params=ASSET_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.s3)])
def cli_backend(request, esper_home, monkeypatch) -> str:
    """The ESPER_* variables on the embedded default, or this test's PostgreSQL + S3."""
    if request.param == "postgres":
        monkeypatch.setenv("ESPER_DATABASE_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("ESPER_S3_BUCKET", request.getfixturevalue("s3_bucket"))
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
    return request.param


@pytest.fixture
def make_checkpoints(
    request, backend: str, make_repo, tmp_path: Path, open_things
) -> Iterator[Callable[[], CheckpointStore]]:
    """``make_checkpoints()``: a CheckpointStore on ``backend``; every call opens the
    same database and object store (a second process's view)."""

    def build() -> CheckpointStore:
        repo = make_repo(backend)
        if backend == "sqlite":
            chunks = ChunkStore(
                make_repo.store(backend), sqlite_path=str(tmp_path / "assets.sqlite3")
            )
        else:
            chunks = ChunkStore(
                make_repo.store(backend), postgres_url=request.getfixturevalue("pg_url")
            )
        open_things.add(chunks)
        return open_things.add(CheckpointStore(chunks, repo))

    yield build
    open_things.close_all()


@pytest.fixture
def checkpoints(make_checkpoints) -> CheckpointStore:
    return make_checkpoints()


def weights(n: int = 10, size: int = 64 * 1024, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` float32 tensors of ``size`` elements each (random, so zstd cannot shrink them)."""
    rng = np.random.default_rng(seed)
    return {f"layer{i}.weight": rng.standard_normal(size, dtype=np.float32) for i in range(n)}


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    """A safetensors file with exactly this header (which may lie) and data."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data
