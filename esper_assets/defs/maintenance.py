"""Cache maintenance: expired-entry cleanup and write-back flush, hourly."""

import dagster as dg

from esper_assets.defs.resources import KernelCacheResource


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


cache_maintenance_schedule = dg.ScheduleDefinition(
    name="hourly_cache_maintenance",
    job=cache_maintenance_job,
    cron_schedule="17 * * * *",
    description="Every hour: drop expired kernels from every tier, flush write-back.",
)
