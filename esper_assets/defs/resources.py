"""Dagster resources: thin shells over ``esper_assets.flows.wiring``.

Each resource holds the part of :class:`~esper_assets.settings.Settings` it needs as
config fields, turns them back into a ``Settings`` inside the run and lets
``wiring`` build the object, so a Dagster run and the CLI build the same cache and
repository from the same values. A value that came from an environment variable
(service URLs may carry passwords) is held as ``dg.EnvVar``: the Dagster UI and
run config show the variable's name, never its value.
"""

# No ``from __future__ import annotations``: Dagster reads the nested-resource fields'
# annotations as classes when a resource class is made (so that ``redis`` may be given
# configured at launch); as strings it would refuse them.
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from typing import Any

import dagster as dg
from dagster_aws.s3 import S3Resource

from esper_assets.blueprints import BlueprintLimits
from esper_assets.checkpoints import CheckpointStore
from esper_assets.checkpoints.retention import RetentionPolicy, grace_from_settings
from esper_assets.errors import InvalidInput
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
    """L2 and cross-process invalidation: a Redis URL, or empty to run without L2.

    The code location holds it as :func:`shared_redis` (configured at launch), so the
    cache nested on it is handed the run's one ``redis`` resource, config included."""

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


def shared_redis(url: str | dg.EnvVar = "") -> Any:  # a PartialResource: not a public name
    """The ``redis`` resource as the code location holds it: configured at launch, so
    a resource nesting it (``KernelCacheResource(redis=...)``) is given the run's
    top-level ``redis`` resource, run config included, not a copy of its own (Dagster
    builds a fully configured nested resource anew, from its definition-time values).
    The same object must be the top-level ``redis``: Dagster refuses to load
    otherwise ("partially configured, nested resources must be provided as a top level
    resource"). ``url`` is its default; ``.data["url"]`` reads it back."""
    return RedisResource.configure_at_launch(url=url)


class KernelCacheResource(dg.ConfigurableResource):
    """The multi-tier kernel cache over the database, Redis and object-store resources
    (``redis``: the location's :func:`shared_redis`)."""

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


# The CheckpointsResource fields that hold ESPER_CHECKPOINT_*: Settings.checkpoint_<name>.
RETENTION_FIELDS = ("keep_last", "keep_every", "keep_days", "retention_action", "gc_grace_hours")


class CheckpointsResource(dg.ConfigurableResource):
    """The checkpoint store (chunks and manifests) over the database and object store,
    the landing directory other tools drop checkpoints into, and the configured
    retention policy and garbage-collection grace (``ESPER_CHECKPOINT_*``; None turns a
    keep rule off) the retention job starts from."""

    database: DatabaseResource
    object_store: ObjectStoreResource
    landing: str = ""  # ESPER_LANDING; checkpoints land under its checkpoints/ folder
    keep_last: int | None = Settings.checkpoint_keep_last
    keep_every: int | None = Settings.checkpoint_keep_every
    keep_days: float | None = Settings.checkpoint_keep_days
    retention_action: str = Settings.checkpoint_retention_action
    gc_grace_hours: float = Settings.checkpoint_gc_grace_hours

    @contextmanager
    def open(self) -> Iterator[CheckpointStore]:
        with wiring.open_checkpoints(self.database.settings(), self.object_store.open()) as store:
            yield store

    def settings(self) -> Settings:
        """The database's settings with this resource's retention values in them."""
        held = {f"checkpoint_{name}": getattr(self, name) for name in RETENTION_FIELDS}
        return replace(self.database.settings(), **held)

    def retention_policy(self) -> RetentionPolicy:
        """The configured policy; InvalidInput naming the resource field if it is bad."""
        if self.keep_days is not None and not self.keep_days >= 0:  # NaN too
            raise self._bad("keep_days", "a number of days >= 0, or None (off)")
        try:
            return RetentionPolicy.from_settings(self.settings())
        except InvalidInput as exc:
            raise InvalidInput(
                f"the checkpoints resource's retention policy is not valid: {exc}; "
                "fix ESPER_CHECKPOINT_* (or the resource's config)"
            ) from None

    def gc_grace(self) -> timedelta:
        """How long an unreferenced chunk a save touched is spared (ESPER_CHECKPOINT_GC_GRACE_HOURS)."""
        if not self.gc_grace_hours >= 0:
            raise self._bad("gc_grace_hours", "a number of hours >= 0")
        return grace_from_settings(self.settings())

    def _bad(self, field: str, expected: str) -> InvalidInput:
        return InvalidInput(
            f"the checkpoints resource's {field} must be {expected}, not {getattr(self, field)!r}; "
            "fix ESPER_CHECKPOINT_* (or the resource's config)"
        )


def _named(variable: str, value: str | None) -> str | dg.EnvVar:
    """``dg.EnvVar(variable)`` when the environment holds ``value`` there (resolved in
    the run, shown by name); else the value itself ("" for None)."""
    return dg.EnvVar(variable) if variable_holds(variable, value) else (value or "")


# The resources others nest: resources_for builds those on an override.
SHARED = ("database", "redis", "object_store")


def resources_for(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Every resource the code location needs, holding ``settings``: ConfigurableResources,
    and ``redis`` configured at launch (:func:`shared_redis`).

    A resource in ``overrides`` replaces the one of its name, and the resources nesting
    ``database``, ``redis`` or ``object_store`` (``repository``, ``kernel_cache``,
    ``checkpoints``) are built on the replacement, so one configuration still serves
    them all; a ``RedisResource`` given is held as :func:`shared_redis` of its url."""
    s3 = BoundedS3Resource(
        endpoint_url=_named("AWS_ENDPOINT_URL", settings.aws_endpoint_url) or None
    )
    home = str(settings.home)
    database = overrides.get("database") or DatabaseResource(
        url=_named("ESPER_DATABASE_URL", settings.database_url), home=home
    )
    redis = overrides.get("redis") or shared_redis(_named("ESPER_REDIS_URL", settings.redis_url))
    if isinstance(redis, RedisResource):
        redis = shared_redis(redis.url)
    object_store = overrides.get("object_store") or ObjectStoreResource(
        bucket=_named("ESPER_S3_BUCKET", settings.s3_bucket), prefix=settings.s3_prefix,
        home=home, s3=s3,
    )  # fmt: skip
    built = {
        "database": database,
        "redis": redis,  # the one the cache is handed in the run
        "object_store": object_store,
        "landing": LandingZoneResource(location=settings.landing, s3=s3),
        "blueprint_rules": BlueprintRulesResource(),
        "repository": AssetRepositoryResource(database=database, object_store=object_store),
        "kernel_cache": KernelCacheResource(
            database=database, redis=redis, object_store=object_store
        ),
        "checkpoints": CheckpointsResource(
            database=database,
            object_store=object_store,
            landing=settings.landing,
            **{name: getattr(settings, f"checkpoint_{name}") for name in RETENTION_FIELDS},
        ),
    }
    return built | {name: r for name, r in overrides.items() if name not in SHARED}
