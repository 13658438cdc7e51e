"""Scheduled upkeep: cache cleanup, cache warming, nightly blueprint re-validation."""

import dagster as dg

from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    KernelCacheResource,
)
from esper_assets.flows import kernels


@dg.op(description="Remove expired entries from every tier and flush write-back keys.")
def clean_kernel_cache(context: dg.OpExecutionContext, kernel_cache: KernelCacheResource) -> dict:
    with kernel_cache.open() as cache:
        removed = cache.cleanup()
        flushed = cache.flush()
        stats = cache.get_stats(include_sizes=True)
    context.log.info(f"removed expired entries per tier: {removed}; flushed {flushed} dirty keys")
    entries = {f"{tier}_entries": s.get("entries") for tier, s in stats["tiers"].items()}
    context.add_output_metadata(
        {**{f"removed_{tier}": n for tier, n in removed.items()}, "flushed": flushed, **entries}
    )
    return removed


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
) -> dict:
    with kernel_cache.open() as cache, repository.open() as repo:
        report = kernels.warm_most_used(cache, repo, config.count)
    counts: dict[str, int] = {}
    for outcome in report.values():
        counts[outcome] = counts.get(outcome, 0) + 1
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
        problems = kernels.revalidate_blueprints(repo, blueprint_rules.limits())
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


schedules = [
    dg.ScheduleDefinition(
        name="hourly_cache_maintenance", job=cache_maintenance_job, cron_schedule="17 * * * *",
        description="Every hour: drop expired kernels from every tier, flush write-back.",
    ),
    dg.ScheduleDefinition(
        name="warm_cache_every_15_minutes", job=warm_kernel_cache_job,
        cron_schedule="*/15 * * * *",
        description="Every 15 minutes: keep the 100 most-used kernels in the fast tiers.",
    ),
    dg.ScheduleDefinition(
        name="nightly_blueprint_revalidation", job=revalidate_blueprints_job,
        cron_schedule="30 2 * * *",
        description="Every night at 02:30: re-validate all registered blueprints.",
    ),
]  # fmt: skip
