"""When the upkeep jobs run. The schedule names are stored with their state in the
instance: renaming one orphans its history."""

import dagster as dg

from esper_assets.defs.upkeep.jobs import (
    cache_maintenance_job,
    revalidate_blueprints_job,
    warm_kernel_cache_job,
)

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
