"""When the upkeep jobs run. The schedule names are stored with their state in the
instance: renaming one orphans its history.

All four run by default (once a daemon runs: ``dg dev``, ``dagster-daemon``): each is
cheap, deletes nothing that is not already expired, and what it writes is either a copy
of what the repository holds or a check result. A schedule turned off in the UI stays
off: the stored state wins over the default. What deletes for real (checkpoint
retention) stays STOPPED, in its own domain.
"""

import dagster as dg

from esper_assets.defs.upkeep.checks import cache_health_job
from esper_assets.defs.upkeep.jobs import (
    cache_maintenance_job,
    revalidate_blueprints_job,
    warm_kernel_cache_job,
)

RUNNING = dg.DefaultScheduleStatus.RUNNING

schedules = [
    dg.ScheduleDefinition(
        name="hourly_cache_maintenance", job=cache_maintenance_job, cron_schedule="17 * * * *",
        default_status=RUNNING,
        description="Every hour: drop expired kernels from every tier, flush write-back. "
        "RUNNING by default: it removes only entries past their TTL (readers already miss "
        "them; the repository still holds every kernel) and makes pending writes durable.",
    ),
    dg.ScheduleDefinition(
        name="warm_cache_every_15_minutes", job=warm_kernel_cache_job,
        cron_schedule="*/15 * * * *",
        default_status=RUNNING,
        description="Every 15 minutes: keep the 100 most-used kernels in the fast tiers, "
        "putting back from the repository any every tier has lost. RUNNING by default: it "
        "only reads and copies (at most 100 kernels), never deletes.",
    ),
    dg.ScheduleDefinition(
        name="nightly_blueprint_revalidation", job=revalidate_blueprints_job,
        cron_schedule="30 2 * * *",
        default_status=RUNNING,
        description="Every night at 02:30: the registered_blueprints_still_valid check on "
        "compiled_kernels (every registered blueprint under today's rules). RUNNING by "
        "default: it only reads the repository and records the check's result.",
    ),
    dg.ScheduleDefinition(
        name="cache_health_every_15_minutes", job=cache_health_job,
        cron_schedule="*/15 * * * *",
        default_status=RUNNING,
        description="Every 15 minutes: the kernel_cache_healthy check on compiled_kernels "
        "(each tier pinged, a probe value written, read back and deleted). RUNNING by "
        "default: it writes and deletes only its own probe key.",
    ),
]  # fmt: skip
