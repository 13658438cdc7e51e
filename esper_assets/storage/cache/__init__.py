"""The multi-tier kernel cache: ``PersistentKernelCache`` (``kernel_cache``) over its
tiers (``tiers/``: L1 memory, L2 Redis, L3 PostgreSQL/SQLite, L4 objects), the byte
format below L1 (``framing``) and circuit breakers and stats (``resilience``).

May import: ``esper_assets.errors``, ``esper_assets.settings``, ``storage.db``,
``storage.objects``. Never the repository, never Dagster.
"""

from esper_assets.storage.cache.kernel_cache import (
    CacheConfig,
    CacheEntry,
    PersistentKernelCache,
    cache_config_from_settings,
    check_kernel_id,
)

__all__ = [
    "CacheConfig",
    "CacheEntry",
    "PersistentKernelCache",
    "cache_config_from_settings",
    "check_kernel_id",
]
