"""The upkeep domain: scheduled jobs that keep the kernel cache clean and warm, and the
nightly re-validation of every registered blueprint as the asset check
``registered_blueprints_still_valid`` on ``compiled_kernels``, and the cache's health
every 15 minutes as the check ``kernel_cache_healthy`` (bodies in ``flows/upkeep`` and
``flows/health``). Its schedules run by default (``schedules.py`` says why)."""

import dagster as dg

from esper_assets.defs.upkeep.checks import (
    cache_health_job,
    kernel_cache_healthy,
    registered_blueprints_still_valid,
)
from esper_assets.defs.upkeep.jobs import (
    cache_maintenance_job,
    revalidate_blueprints_job,
    warm_kernel_cache_job,
)
from esper_assets.defs.upkeep.schedules import schedules

# Resources are bound once, for every domain, in ``esper_assets.defs.build_definitions``.
definitions = dg.Definitions(
    asset_checks=[registered_blueprints_still_valid, kernel_cache_healthy],
    jobs=[
        cache_maintenance_job,
        warm_kernel_cache_job,
        revalidate_blueprints_job,
        cache_health_job,
    ],
    schedules=schedules,
)
