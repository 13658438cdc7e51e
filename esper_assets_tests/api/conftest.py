"""Fixtures of the API tests: a kernel repository and cache seeded through the wiring,
and ``esper serve`` started on them as a real process (see server.py)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from esper_assets.flows import wiring
from esper_assets.settings import Settings
from esper_assets.storage import AssetMetadata
from esper_assets_tests.api.server import ApiServer, server_env

TOKEN = "test-token-" + "x" * 20


@dataclass
class Seeded:
    """What a test put in the repository and cache before the server started."""

    env: dict[str, str]
    blueprint_id: str = ""
    kernels: dict[str, bytes] = field(default_factory=dict)  # id -> bytes
    tag: str = ""


def seed(env: dict[str, str], sizes: dict[str, int], in_cache: bool = True) -> Seeded:
    """A blueprint and one kernel per ``sizes`` item (its child), registered in the
    repository (and put in the cache), through the wiring on ``env``'s settings."""
    settings = Settings.from_env(env)
    run = uuid.uuid4().hex[:8]
    seeded = Seeded(env, tag=f"t{run}")
    store = wiring.object_store(settings)
    with (
        wiring.open_repository(settings, store) as repo,
        wiring.open_cache(settings, store) as cache,
    ):
        seeded.blueprint_id = repo.create_asset(
            AssetMetadata(asset_type="blueprint", name=f"bp-{run}", version="1.0.0"), b"{}"
        )
        for i, (label, size) in enumerate(sizes.items()):
            kernel_id, data = f"k-{run}-{label}", os.urandom(size)
            meta = AssetMetadata(
                asset_type="kernel", asset_id=kernel_id, name=f"bp-{run}", version=f"1.0.{i}",
                parent_id=seeded.blueprint_id, derived_from=[seeded.blueprint_id],
                tags={seeded.tag, f"size-{label}"},
            )  # fmt: skip
            repo.create_asset(meta, data)
            if in_cache:
                cache.put(kernel_id, data)
            seeded.kernels[kernel_id] = data
    return seeded


@pytest.fixture(params=["embedded", pytest.param("services", marks=pytest.mark.private_services)])
def backend_env(request, tmp_path: Path) -> dict[str, str]:
    """The server's environment: the embedded default under ``tmp_path``, or PostgreSQL
    (the test's schema) + Redis + S3 (moto, the test's bucket).

    The Redis is the test's own (private_redis): a server has no key prefix of the
    test's, so on a shared Redis its invalidation channel is every other test's and
    session's, and an invalidation of any id arriving while it loads one keeps that load
    out of L1 (the cache's rule): a load counted twice, an L1 hit missing."""
    if request.param == "embedded":
        return server_env(tmp_path / "home", ESPER_API_TOKEN=TOKEN)
    return server_env(
        tmp_path / "home", ESPER_API_TOKEN=TOKEN,
        ESPER_DATABASE_URL=request.getfixturevalue("pg_url"),
        ESPER_REDIS_URL=request.getfixturevalue("private_redis").url,
        ESPER_S3_BUCKET=request.getfixturevalue("s3_bucket"),
        AWS_ENDPOINT_URL=request.getfixturevalue("s3_endpoint"),
    )  # fmt: skip


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], ApiServer]]:
    """``start_server(env)``: ``esper serve`` on ``env``, stopped after the test."""
    started: list[ApiServer] = []

    def start(env: dict[str, str]) -> ApiServer:
        started.append(ApiServer(env, tmp_path / f"serve-{len(started)}.log"))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def forget(seeded: Seeded) -> None:
    """Invalidate the seeded kernels in every tier (the shared Redis keeps no keys of ours)."""
    with wiring.open_cache(Settings.from_env(seeded.env)) as cache:
        for kernel_id in seeded.kernels:
            cache.invalidate(kernel_id)


@pytest.fixture
def served(backend_env, start_server) -> Iterator[tuple[ApiServer, Seeded]]:
    """Three kernels (4 KiB, 256 KiB, 3 MiB: over L4's threshold) and the server."""
    seeded = seed(backend_env, {"small": 4096, "medium": 256 * 1024, "large": 3 << 20})
    yield start_server(backend_env), seeded
    forget(seeded)
