"""Storage layer, in rooms: ``db/`` (pools, SQL errors, migrations), ``objects/``
(directory and S3 object stores), ``cache/`` (PersistentKernelCache and its tiers),
``repository/`` (AssetRepository). This module re-exports the public names.

Imports nothing from Dagster: training processes use it directly::

    from esper_assets.storage import PersistentKernelCache
    cache = PersistentKernelCache.from_env()
    kernel = cache.get(kernel_id)
"""

from esper_assets.storage.cache import CacheConfig, CacheEntry, PersistentKernelCache
from esper_assets.storage.cache.tiers.memory import MemoryTier
from esper_assets.storage.cache.tiers.objects import ObjectTier
from esper_assets.storage.cache.tiers.redis import RedisTier
from esper_assets.storage.cache.tiers.sql import PostgresTier, SqliteTier
from esper_assets.storage.objects import DirectoryObjectStore, ObjectStore, S3ObjectStore
from esper_assets.storage.repository import AssetMetadata, AssetQuery, AssetRepository

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
