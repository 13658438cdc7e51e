"""Dagster code location: ``dagster dev`` / workspace.yaml load ``defs`` from here.

So far it holds the kernel-cache resource and the cache-maintenance job; the
blueprint -> kernel asset pipeline builds on these.
"""

import dagster as dg

from esper_assets.defs.maintenance import cache_maintenance_job, cache_maintenance_schedule
from esper_assets.defs.resources import KernelCacheResource

defs = dg.Definitions(
    jobs=[cache_maintenance_job],
    schedules=[cache_maintenance_schedule],
    resources={"kernel_cache": KernelCacheResource()},
)
