"""Storage layer: tiers, the kernel cache, object stores and migrations.

Imports nothing from Dagster: training processes use it directly::

    from esper_assets.storage import PersistentKernelCache
    cache = PersistentKernelCache.from_env()
    kernel = cache.get(kernel_id)
"""

from esper_assets.storage.assets import AssetMetadata, AssetQuery, AssetRepository
from esper_assets.storage.kernel_cache import CacheConfig, CacheEntry, PersistentKernelCache
from esper_assets.storage.memory import MemoryTier
from esper_assets.storage.object_store import (
    DirectoryObjectStore,
    ObjectStore,
    ObjectTier,
    S3ObjectStore,
)
from esper_assets.storage.redis_tier import RedisTier
from esper_assets.storage.sql_tier import PostgresTier, SqliteTier

# The seeds' names for the L2 and L3 backends.
RedisBackend = RedisTier
PostgreSQLBackend = PostgresTier

__all__ = [
    "AssetMetadata",
    "AssetQuery",
    "AssetRepository",
    "CacheConfig",
    "CacheEntry",
    "DirectoryObjectStore",
    "MemoryTier",
    "ObjectStore",
    "ObjectTier",
    "PersistentKernelCache",
    "PostgreSQLBackend",
    "PostgresTier",
    "RedisBackend",
    "RedisTier",
    "S3ObjectStore",
    "SqliteTier",
]
