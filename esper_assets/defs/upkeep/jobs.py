"""The upkeep jobs: one op each, a thin Dagster shell (logs, metadata, failure) around
``esper_assets.flows.upkeep``."""

import dagster as dg

from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    KernelCacheResource,
    ObjectStoreResource,
)
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


@dg.op(description="Parse every registered blueprint again under today's rules and check "
       "that its parent is still registered.")  # fmt: skip
def revalidate_all_blueprints(
    context: dg.OpExecutionContext,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
) -> int:
    with repository.open() as repo:
        problems = upkeep.revalidate_blueprints(repo, blueprint_rules.limits())
    for name, why in problems.items():
        context.log.error(f"{name}: {why}")
    context.add_output_metadata({"invalid": len(problems), "names": ", ".join(problems)})
    if problems:
        raise dg.Failure(
            description=f"{len(problems)} registered blueprint(s) no longer pass: "
            + "; ".join(f"{n}: {w}" for n, w in problems.items())[:4000],
        )
    return 0


@dg.job(description="Re-validate every registered blueprint (rules may have tightened).")
def revalidate_blueprints_job() -> None:
    revalidate_all_blueprints()
