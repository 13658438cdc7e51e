"""The one place storage objects are built from :class:`~esper_assets.settings.Settings`.

The CLI, the runner, the bench and the Dagster resources all build the kernel
cache, the asset repository, the object store and the landing zone through these
functions, so a setting means the same thing wherever it is read. Nothing here
reads the environment: pass ``Settings.from_env()`` (or any other ``Settings``).

``open_cache``, ``open_repository`` and ``open_checkpoints`` are context managers: both own threads and
connections that must be closed. ``object_store`` and ``landing_zone`` return
plain objects (nothing to close). Each takes an S3 client or an object store
built elsewhere (the Dagster resources pass dagster-aws's), else builds its own
from the settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from esper_assets.analytics.events import UsageRecorder
from esper_assets.checkpoints import CheckpointStore
from esper_assets.flows.landing import LandingZone, landing_from_location
from esper_assets.settings import Settings
from esper_assets.storage.cache import PersistentKernelCache, cache_config_from_settings
from esper_assets.storage.chunks import ChunkStore
from esper_assets.storage.objects import ObjectStore, make_s3_client, object_store_from_settings
from esper_assets.storage.repository import AssetRepository

# Wraps a usage recorder (or None when usage is off) in another usage sink.
UsageTap = Callable[[Any], Any]

__all__ = [
    "landing_zone",
    "object_store",
    "open_cache",
    "open_checkpoints",
    "open_repository",
    "s3_client",
    "usage_recorder",
]


def s3_client(settings: Settings, timeout_s: float = 2.0):
    """A bounded boto3 S3 client for ``AWS_ENDPOINT_URL`` (one attempt, ``timeout_s``
    per wait; see :func:`~esper_assets.storage.objects.make_s3_client`)."""
    return make_s3_client(settings.aws_endpoint_url, timeout_s)


def object_store(settings: Settings, client=None) -> ObjectStore:
    """L4 and the repository's large objects: ``ESPER_S3_BUCKET`` under
    ``ESPER_S3_PREFIX`` (through ``client``, else a bounded client of our own), or
    the directory ``ESPER_HOME/objects``."""
    return object_store_from_settings(settings, client=client)


def landing_zone(settings: Settings, client=None) -> LandingZone:
    """Where blueprint files arrive: ``ESPER_LANDING``, a directory or
    ``s3://bucket/prefix`` (read through ``client``, else a bounded client of our own)."""
    if settings.landing.startswith("s3://"):
        return landing_from_location(settings.landing, client or s3_client(settings))
    return landing_from_location(settings.landing)


@contextmanager
def usage_recorder(
    settings: Settings, store: ObjectStore | None = None
) -> Iterator[UsageRecorder | None]:
    """A UsageRecorder flushing every ``ESPER_USAGE_FLUSH_S`` into ``store`` (default:
    :func:`object_store`, where the repository's objects live), closed on exit; None
    when ``ESPER_USAGE=off``."""
    if not settings.usage:
        yield None
        return
    recorder = UsageRecorder(
        store if store is not None else object_store(settings), flush_s=settings.usage_flush_s
    )
    try:
        yield recorder
    finally:
        recorder.close()


@contextmanager
def open_repository(
    settings: Settings, store: ObjectStore | None = None, usage_tap: UsageTap | None = None
) -> Iterator[AssetRepository]:
    """The asset repository on ``ESPER_DATABASE_URL`` (or the SQLite file under
    ``ESPER_HOME``), its large objects in ``store`` (default: :func:`object_store`); its
    reads recorded by a :func:`usage_recorder` on that store (through ``usage_tap(recorder
    or None)`` when given: the API's metrics see them that way)."""
    store = store if store is not None else object_store(settings)
    with usage_recorder(settings, store) as usage:
        usage = usage_tap(usage) if usage_tap is not None else usage
        repo = AssetRepository.from_settings(settings, object_store=store, usage=usage)
        try:
            yield repo
        finally:
            repo.close()


@contextmanager
def open_cache(
    settings: Settings,
    store: ObjectStore | None = None,
    usage_tap: UsageTap | None = None,
    **config: Any,
) -> Iterator[PersistentKernelCache]:
    """The kernel cache over Redis (L2), the database (L3) and ``store`` (L4; default:
    the store the settings name, built by the cache from its config so that
    ``object_store_timeout_s`` and ``l4_enabled`` apply). ``config`` overrides
    :class:`CacheConfig` fields (e.g. ``l1_size_mb=64``, ``write_mode="write_back"``).
    Its reads are recorded by a :func:`usage_recorder` on the repository's store (through
    ``usage_tap``, as :func:`open_repository`)."""
    with usage_recorder(settings, store) as usage:
        usage = usage_tap(usage) if usage_tap is not None else usage
        cache = PersistentKernelCache(
            cache_config_from_settings(settings, **config), object_store=store, usage=usage
        )
        try:
            yield cache
        finally:
            cache.close()


@contextmanager
def open_checkpoints(
    settings: Settings, store: ObjectStore | None = None
) -> Iterator[CheckpointStore]:
    """Checkpoints: chunks and manifests on the settings' database, both in ``store``
    (default: :func:`object_store`), built like :func:`open_repository`."""
    store = store if store is not None else object_store(settings)
    with open_repository(settings, store) as repo:
        chunks = ChunkStore.from_settings(settings, store=store)
        try:
            with CheckpointStore(chunks, repo) as checkpoints:
                yield checkpoints
        finally:
            chunks.close()
