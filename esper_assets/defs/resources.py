"""Dagster resources: thin shells over ``esper_assets.flows.wiring``.

Each resource holds the part of :class:`~esper_assets.settings.Settings` it needs as
config fields, turns them back into a ``Settings`` inside the run and lets
``wiring`` build the object, so a Dagster run and the CLI build the same cache and
repository from the same values. A value that came from an environment variable
(service URLs may carry passwords) is held as ``dg.EnvVar``: the Dagster UI and
run config show the variable's name, never its value.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from dagster_aws.s3 import S3Resource

from esper_assets.blueprints import BlueprintLimits
from esper_assets.checkpoints import CheckpointStore
from esper_assets.flows import wiring
from esper_assets.flows.landing import LandingZone
from esper_assets.settings import Settings, variable_holds
from esper_assets.storage import AssetRepository, PersistentKernelCache
from esper_assets.storage.objects import ObjectStore, make_s3_client


class DatabaseResource(dg.ConfigurableResource):
    """L3 and the asset repository: a PostgreSQL URL, or empty for the SQLite file in ``home``."""

    url: str = ""
    home: str = ""

    def environ(self) -> dict[str, str]:
        return {"ESPER_HOME": self.home, "ESPER_DATABASE_URL": self.url}

    def settings(self) -> Settings:
        return Settings.from_env(self.environ())


class RedisResource(dg.ConfigurableResource):
    """L2 and cross-process invalidation: a Redis URL, or empty to run without L2."""

    url: str = ""

    def environ(self) -> dict[str, str]:
        return {"ESPER_REDIS_URL": self.url}


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
    """L4 and large objects: an S3 bucket through dagster-aws, or ``home``/objects."""

    bucket: str = ""
    prefix: str = "esper"
    home: str = ""  # its objects/ folder is the store when no bucket is set
    s3: S3Resource

    def environ(self) -> dict[str, str]:
        return {"ESPER_HOME": self.home, "ESPER_S3_BUCKET": self.bucket,
                "ESPER_S3_PREFIX": self.prefix}  # fmt: skip

    def open(self) -> ObjectStore:
        client = self.s3.get_client() if self.bucket else None
        return wiring.object_store(Settings.from_env(self.environ()), client)


class LandingZoneResource(dg.ConfigurableResource):
    """Where blueprint files arrive: a directory or ``s3://bucket/prefix``."""

    location: str
    s3: S3Resource

    def open(self) -> LandingZone:
        client = self.s3.get_client() if self.location.startswith("s3://") else None
        return wiring.landing_zone(Settings.from_env({"ESPER_LANDING": self.location}), client)


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
        with wiring.open_repository(self.database.settings(), self.object_store.open()) as repo:
            yield repo


class KernelCacheResource(dg.ConfigurableResource):
    """The multi-tier kernel cache over the database, Redis and object-store resources."""

    database: DatabaseResource
    redis: RedisResource
    object_store: ObjectStoreResource
    l1_size_mb: float = 256
    write_mode: str = "write_through"

    @contextmanager
    def open(self) -> Iterator[PersistentKernelCache]:
        settings = Settings.from_env(self.database.environ() | self.redis.environ())
        store = self.object_store.open()
        tuning = {"l1_size_mb": self.l1_size_mb, "write_mode": self.write_mode}
        with wiring.open_cache(settings, store, **tuning) as cache:
            yield cache


class CheckpointsResource(dg.ConfigurableResource):
    """The checkpoint store (chunks and manifests) over the database and object store,
    and the landing directory other tools drop checkpoints into."""

    database: DatabaseResource
    object_store: ObjectStoreResource
    landing: str = ""  # ESPER_LANDING; checkpoints land under its checkpoints/ folder

    @contextmanager
    def open(self) -> Iterator[CheckpointStore]:
        with wiring.open_checkpoints(self.database.settings(), self.object_store.open()) as store:
            yield store


def _named(variable: str, value: str | None) -> str | dg.EnvVar:
    """``dg.EnvVar(variable)`` when the environment holds ``value`` there (resolved in
    the run, shown by name); else the value itself ("" for None)."""
    return dg.EnvVar(variable) if variable_holds(variable, value) else (value or "")


def resources_for(settings: Settings) -> dict[str, dg.ConfigurableResource]:
    """Every resource the code location needs, holding ``settings``."""
    s3 = BoundedS3Resource(
        endpoint_url=_named("AWS_ENDPOINT_URL", settings.aws_endpoint_url) or None
    )
    home = str(settings.home)
    database = DatabaseResource(url=_named("ESPER_DATABASE_URL", settings.database_url), home=home)
    redis = RedisResource(url=_named("ESPER_REDIS_URL", settings.redis_url))
    object_store = ObjectStoreResource(
        bucket=_named("ESPER_S3_BUCKET", settings.s3_bucket), prefix=settings.s3_prefix,
        home=home, s3=s3,
    )  # fmt: skip
    return {
        "database": database,
        "redis": redis,  # the very resource the cache uses
        "object_store": object_store,
        "landing": LandingZoneResource(location=settings.landing, s3=s3),
        "blueprint_rules": BlueprintRulesResource(),
        "repository": AssetRepositoryResource(database=database, object_store=object_store),
        "kernel_cache": KernelCacheResource(
            database=database, redis=redis, object_store=object_store
        ),
        "checkpoints": CheckpointsResource(
            database=database, object_store=object_store, landing=settings.landing
        ),
    }
