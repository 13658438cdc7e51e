"""What a cache is built from and what it hands out: :class:`CacheConfig` (and
:func:`cache_config_from_settings`, which fills its locations from ``Settings``),
:class:`CacheEntry`, and the rules for a kernel id (:func:`check_kernel_id`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from esper_assets.errors import ConfigError, InvalidKernelId
from esper_assets.settings import Settings

MAX_ID_LENGTH = 255
WRITE_MODES = ("write_through", "write_back")


@dataclass
class CacheConfig:
    """Everything the cache needs; ``PersistentKernelCache.from_env`` fills the locations."""

    # L1 (in-process memory)
    l1_enabled: bool = True
    l1_size_mb: float = 256
    l1_ttl_seconds: float | None = 3600
    eviction_policy: str = "lru"  # lru, lfu, fifo
    admission: bool = True  # TinyLFU-style frequency admission in front of eviction
    # L2 (Redis)
    l2_enabled: bool = True  # and only when redis_url is set
    l2_ttl_seconds: float | None = 86400
    redis_url: str | None = None
    redis_prefix: str = "esper:kc:"
    # L3 (PostgreSQL, or SQLite embedded)
    l3_enabled: bool = True
    l3_ttl_seconds: float | None = 7 * 86400
    postgres_url: str | None = None
    sqlite_path: str | None = None
    # L4 (object store: S3 bucket, or a directory embedded)
    l4_enabled: bool = True
    l4_ttl_seconds: float | None = None  # archival: kept until invalidated
    object_store_path: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "esper"
    s3_endpoint_url: str | None = None
    archive_to_l4: bool = False  # also copy values below the threshold to L4
    large_object_threshold: int = 1 << 20  # above this: stored once in L4, pointer row in L3
    max_value_bytes: int = 512 << 20
    # behaviour
    enable_compression: bool = True
    compression: str = "zstd"  # zstd, gzip, none
    compression_level: int = 3
    enable_metrics: bool = True
    write_mode: str = "write_through"
    write_back_interval_s: float = 0.5
    write_back_max_dirty_bytes: int = 64 << 20
    warm_cache_on_startup: bool = False
    warm_startup_count: int = 100
    access_flush_interval_s: float = 5.0
    redis_timeout_s: float = 0.25
    sql_timeout_s: float = 3.0
    object_store_timeout_s: float = 2.0
    breaker_failure_threshold: int = 1
    breaker_reset_s: float = 2.0
    # invalidation (see docs/ARCHITECTURE.md, "Invalidation and staleness")
    invalidation_poll_s: float = 1.0  # how often L3's change log is read: the embedded bound
    invalidation_fence_s: float = 60.0  # how long an invalidated id refuses refills (L2, L3)

    def __post_init__(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise ConfigError(
                f"write_mode={self.write_mode!r} is unknown; use one of {list(WRITE_MODES)}"
            )
        if self.large_object_threshold <= 0 or self.max_value_bytes <= 0:
            raise ConfigError(
                "large_object_threshold and max_value_bytes must be positive byte counts"
            )
        for name in ("invalidation_poll_s", "invalidation_fence_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"{name}={getattr(self, name)!r}: use a positive number of seconds"
                )
        for name in ("l1_ttl_seconds", "l2_ttl_seconds", "l3_ttl_seconds", "l4_ttl_seconds"):
            ttl = getattr(self, name)
            if ttl is not None and ttl <= 0:
                raise ConfigError(
                    f"{name}={ttl!r}: use a positive number of seconds, or None for no expiry"
                )


def cache_config_from_settings(settings: Settings, **overrides: Any) -> CacheConfig:
    values: dict[str, Any] = {
        "redis_url": settings.redis_url,
        "postgres_url": settings.database_url,
        "sqlite_path": None if settings.database_url else str(settings.sqlite_path),
        "s3_bucket": settings.s3_bucket,
        "s3_prefix": settings.s3_prefix,
        "s3_endpoint_url": settings.aws_endpoint_url,
        "object_store_path": None if settings.s3_bucket else str(Path(settings.objects_dir)),
    }
    values.update(overrides)
    return CacheConfig(**values)


@dataclass
class CacheEntry:
    """A value with what the durable tier knows about it."""

    key: str
    value: bytes
    metadata: dict[str, Any]
    created_at: datetime | None
    accessed_at: datetime
    ttl_seconds: float | None = None
    compressed: bool = False
    in_object_store: bool = False


def is_valid_id(kernel_id: object) -> bool:
    try:
        check_kernel_id(kernel_id)
    except InvalidKernelId:
        return False
    return True


def check_kernel_id(kernel_id: object) -> str:
    if not isinstance(kernel_id, str):
        raise InvalidKernelId(f"kernel id must be a str, got {type(kernel_id).__name__}")
    if not kernel_id:
        raise InvalidKernelId("kernel id is empty; use the blueprint's content hash")
    if len(kernel_id) > MAX_ID_LENGTH:
        raise InvalidKernelId(
            f"kernel id is {len(kernel_id)} characters; the limit is {MAX_ID_LENGTH} "
            f"(starts {kernel_id[:32]!r}); use a hash"
        )
    if not kernel_id.isprintable():
        raise InvalidKernelId(f"kernel id {kernel_id!r} holds unprintable characters")
    return kernel_id
