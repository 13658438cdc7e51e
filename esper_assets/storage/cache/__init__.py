"""The multi-tier kernel cache: ``PersistentKernelCache`` over L1 memory, L2 Redis,
L3 PostgreSQL/SQLite and L4 objects.

Modules, from the façade down:

- ``kernel_cache``  PersistentKernelCache, the façade: the L1 hit path, the public
                    methods, stats, health, lifecycle, and the seams that show its parts
                    (``tier()``, ``slot()``, ``breaker_states()``, ``pending_writes()``,
                    ``maintain_now()``, ...).
- ``config``        CacheConfig, cache_config_from_settings, CacheEntry, check_kernel_id.
- ``reads``         below L1: single-flight, the waterfall L2 -> L3 -> L4, promotion and
                    corruption repair, warming.
- ``writes``        what a put checks and encodes; write-through (durable tiers first to
                    acknowledge, fast ones beside them) and the write-back put.
- ``write_back``    the dirty values a write-back put left, and their flush.
- ``maintenance``   the background thread: L3's change log (other processes'
                    invalidations), sharing L2 debt, write-back flushes, access counts.
- ``slots``         the tiers in their slots: level name, tier, circuit breaker, stats,
                    guarded calls, and what differs per level (how a batch is written,
                    which values a level holds); builds them from a CacheConfig.
- ``l2_debt``       ids whose Redis copy may be stale, fenced before L2 is used again.
- ``framing``       the byte format of every tier below L1, and the codecs.
- ``resilience``    CircuitBreaker, TierStats, LatencyWindow.
- ``tiers/``        one module per tier: ``memory`` (L1), ``redis`` (L2 and pub/sub
                    invalidation), ``sql`` (L3 and its change log), ``objects`` (L4).

Import what this package exports (below) and the tier classes from ``tiers/``; the
other modules are the cache's insides.

May import: ``esper_assets.errors``, ``esper_assets.settings``, ``storage.db``,
``storage.objects``. Never the repository, never Dagster.
"""

from esper_assets.storage.cache.config import (
    CacheConfig,
    CacheEntry,
    cache_config_from_settings,
    check_kernel_id,
)
from esper_assets.storage.cache.kernel_cache import PersistentKernelCache

__all__ = [
    "CacheConfig",
    "CacheEntry",
    "PersistentKernelCache",
    "cache_config_from_settings",
    "check_kernel_id",
]
