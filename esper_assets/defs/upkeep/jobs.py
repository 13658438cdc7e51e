"""The upkeep jobs: the cache's two, one op each, a thin Dagster shell (logs, metadata)
around ``esper_assets.flows.upkeep``; and ``revalidate_blueprints_job``, the asset job
running the re-validation check (``checks.py``)."""

import dagster as dg

from esper_assets.defs.resources import (
    AssetRepositoryResource,
    KernelCacheResource,
    ObjectStoreResource,
)
from esper_assets.defs.upkeep.checks import revalidate_blueprints_job
from esper_assets.flows import upkeep


@dg.op(description="Remove expired entries from every tier and flush write-back keys.")
def clean_kernel_cache(context: dg.OpExecutionContext, kernel_cache: KernelCacheResource) -> dict:
    with kernel_cache.open() as cache:
        done = upkeep.clean_cache(cache)
    context.log.info(
        f"removed expired entries per tier: {done.removed}; flushed {done.flushed} dirty keys"
    )
    context.add_output_metadata(
        {
            **{f"removed_{tier}": n for tier, n in done.removed.items()},
            "flushed": done.flushed,
            **{f"{tier}_entries": n for tier, n in done.entries.items()},
        }
    )
    return done.removed


@dg.job(description="Expired-entry cleanup and write-back flush for the kernel cache.")
def cache_maintenance_job() -> None:
    clean_kernel_cache()


class WarmConfig(dg.Config):
    count: int = 100


@dg.op(description="Load the most-used kernels into the fast tiers, from the repository if "
       "the cache has lost them.")  # fmt: skip
def warm_most_used_kernels(
    context: dg.OpExecutionContext,
    config: WarmConfig,
    kernel_cache: KernelCacheResource,
    repository: AssetRepositoryResource,
    object_store: ObjectStoreResource,
) -> dict:
    with kernel_cache.open() as cache, repository.open() as repo:
        report = upkeep.warm_most_used(cache, repo, config.count, object_store.open())
    counts = upkeep.outcome_counts(report)
    context.log.info(f"warmed {len(report)} kernels: {counts}")
    context.add_output_metadata({"kernels": len(report), **counts})
    return counts


@dg.job(description="Warm the kernel cache with the most-used kernels.")
def warm_kernel_cache_job() -> None:
    warm_most_used_kernels()


__all__ = ["cache_maintenance_job", "revalidate_blueprints_job", "warm_kernel_cache_job"]
