"""Dagster resources: thin builders of storage objects.

Each resource is a ``ConfigurableResource`` whose fields come from the same
``ESPER_*`` environment the rest of esper_assets reads. Service URLs, which may
carry passwords, are passed as ``dg.EnvVar`` so the Dagster UI and run config show
the variable's name, never its value; the values are validated by
:class:`esper_assets.settings.Settings`, the one place that knows the rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from dagster_aws.s3 import S3Resource

from esper_assets.blueprints import BlueprintLimits
from esper_assets.flows.landing import LandingZone, landing_from_location
from esper_assets.settings import Settings
from esper_assets.storage import AssetRepository, PersistentKernelCache
from esper_assets.storage.cache.kernel_cache import cache_config_from_settings
from esper_assets.storage.objects import (
    DirectoryObjectStore,
    ObjectStore,
    S3ObjectStore,
    make_s3_client,
)


class DatabaseResource(dg.ConfigurableResource):
    """L3 and the asset repository: a PostgreSQL URL, or empty for the SQLite file in ``home``."""

    url: str = ""
    home: str = ""

    def settings(self) -> Settings:
        return Settings.from_env({"ESPER_HOME": self.home, "ESPER_DATABASE_URL": self.url})


class RedisResource(dg.ConfigurableResource):
    """L2 and cross-process invalidation: a Redis URL, or empty to run without L2."""

    url: str = ""

    def checked_url(self) -> str | None:
        return Settings.from_env({"ESPER_REDIS_URL": self.url}).redis_url


class BoundedS3Resource(S3Resource):
    """dagster-aws's S3Resource, its client bounded like the library's: one attempt,
    ``timeout_s`` per wait (see ``make_s3_client``). Its own client keeps botocore's
    60 s timeouts and retries, about three minutes per call to a frozen endpoint."""

    timeout_s: float = 2.0

    def get_client(self):
        import boto3

        if self.use_unsigned_session:  # not something esper uses: dagster-aws's client
            return super().get_client()
        session = boto3.session.Session(
            profile_name=self.profile_name,
            region_name=self.region_name,
            aws_access_key_id=self.aws_access_key_id,
            aws_secret_access_key=self.aws_secret_access_key,
            aws_session_token=self.aws_session_token,
        )
        return make_s3_client(
            self.endpoint_url, self.timeout_s, session, use_ssl=self.use_ssl, verify=self.verify
        )


class ObjectStoreResource(dg.ConfigurableResource):
    """L4 and large objects: an S3 bucket through dagster-aws, or a directory."""

    bucket: str = ""
    prefix: str = "esper"
    directory: str = ""  # used when no bucket is set
    s3: S3Resource

    def open(self) -> ObjectStore:
        if self.bucket:
            settings = Settings.from_env({"ESPER_S3_BUCKET": self.bucket})  # validates the name
            return S3ObjectStore(self.s3.get_client(), settings.s3_bucket, self.prefix.strip("/"))
        return DirectoryObjectStore(self.directory or Settings.from_env({}).objects_dir)


class LandingZoneResource(dg.ConfigurableResource):
    """Where blueprint files arrive: a directory or ``s3://bucket/prefix``."""

    location: str
    s3: S3Resource

    def open(self) -> LandingZone:
        s3_client = self.s3.get_client() if self.location.startswith("s3://") else None
        return landing_from_location(self.location, s3_client)


class BlueprintRulesResource(dg.ConfigurableResource):
    """Size limits every blueprint must meet (file, layers, parameters, dimensions)."""

    max_file_bytes: int = BlueprintLimits.max_file_bytes
    max_layers: int = BlueprintLimits.max_layers
    max_parameters: int = BlueprintLimits.max_parameters
    max_dimension: int = BlueprintLimits.max_dimension

    def limits(self) -> BlueprintLimits:
        return BlueprintLimits(
            max_file_bytes=self.max_file_bytes,
            max_layers=self.max_layers,
            max_parameters=self.max_parameters,
            max_dimension=self.max_dimension,
        )


class AssetRepositoryResource(dg.ConfigurableResource):
    database: DatabaseResource
    object_store: ObjectStoreResource

    @contextmanager
    def open(self) -> Iterator[AssetRepository]:
        settings = self.database.settings()
        repo = AssetRepository(
            postgres_url=settings.database_url,
            sqlite_path=None if settings.database_url else str(settings.sqlite_path),
            object_store=self.object_store.open(),
        )
        try:
            yield repo
        finally:
            repo.close()


class KernelCacheResource(dg.ConfigurableResource):
    """The multi-tier kernel cache over the database, Redis and object-store resources."""

    database: DatabaseResource
    redis: RedisResource
    object_store: ObjectStoreResource
    l1_size_mb: float = 256
    write_mode: str = "write_through"

    @contextmanager
    def open(self) -> Iterator[PersistentKernelCache]:
        settings = self.database.settings()
        config = cache_config_from_settings(
            settings, redis_url=self.redis.checked_url(), l1_size_mb=self.l1_size_mb,
            write_mode=self.write_mode,
        )  # fmt: skip
        cache = PersistentKernelCache(config, object_store=self.object_store.open())
        try:
            yield cache
        finally:
            cache.close()


def _env(name: str, default: str = "") -> str | dg.EnvVar:
    """The variable as a ``dg.EnvVar`` when it is set (resolved in the run, shown by name)."""
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else default


def resources_from_env() -> dict[str, dg.ConfigurableResource]:
    """Every resource the code location needs, from ``ESPER_*`` and ``AWS_*``."""
    settings = Settings.from_env()  # fail at load time, naming the bad variable
    s3 = BoundedS3Resource(endpoint_url=_env("AWS_ENDPOINT_URL") or None)
    database = DatabaseResource(url=_env("ESPER_DATABASE_URL"), home=str(settings.home))
    object_store = ObjectStoreResource(
        bucket=_env("ESPER_S3_BUCKET"), prefix=settings.s3_prefix,
        directory=str(settings.objects_dir), s3=s3,
    )  # fmt: skip
    redis = RedisResource(url=_env("ESPER_REDIS_URL"))
    return {
        "database": database,
        "redis": redis,
        "object_store": object_store,
        "landing": LandingZoneResource(location=settings.landing, s3=s3),
        "blueprint_rules": BlueprintRulesResource(),
        "repository": AssetRepositoryResource(database=database, object_store=object_store),
        "kernel_cache": KernelCacheResource(
            database=database,
            redis=RedisResource(url=_env("ESPER_REDIS_URL")),
            object_store=object_store,
        ),  # fmt: skip
    }
