"""The upkeep domain: scheduled jobs that keep the kernel cache clean and warm and
re-validate every registered blueprint nightly (bodies in ``flows/upkeep``)."""

import dagster as dg

from esper_assets.defs.upkeep.jobs import (
    cache_maintenance_job,
    revalidate_blueprints_job,
    warm_kernel_cache_job,
)
from esper_assets.defs.upkeep.schedules import schedules

# Resources are bound once, for every domain, in ``esper_assets.defs.build_definitions``.
definitions = dg.Definitions(
    jobs=[cache_maintenance_job, warm_kernel_cache_job, revalidate_blueprints_job],
    schedules=schedules,
)
