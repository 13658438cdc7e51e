"""The analytics domain: five daily-partitioned assets over the usage files
(``usage_events_daily`` -> ``kernel_usage_daily``, ``cache_warm_list``,
``retirement_candidates``; and ``asset_inventory``) with their checks, the
``analytics_daily`` job over them and its schedule (STOPPED by default: a
deployment turns it on once its usage files are worth rolling up). Logic in
``esper_assets.analytics.rollups``."""

import dagster as dg

from esper_assets.defs._compat import PARTITION_NAME_TAG
from esper_assets.defs.analytics.assets import ASSETS, analytics_days

__all__ = ["analytics_daily_job", "analytics_days", "definitions"]

analytics_daily_job = dg.define_asset_job(
    "analytics_daily",
    selection=dg.AssetSelection.assets(*ASSETS),
    description="Roll up one day of usage: compaction, kernel usage, warm list, "
    "retirement candidates (listed, not applied) and the repository inventory.",
)


@dg.schedule(
    job=analytics_daily_job,
    cron_schedule="30 0 * * *",  # 00:30 UTC: the day before is complete, its files flushed
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every day at 00:30 UTC: materialize the day before's analytics partition.",
)
def analytics_daily_at_0030() -> dg.RunRequest:
    # The newest complete day (yesterday, UTC). A plain schedule rather than
    # build_schedule_from_partitioned_job, which stays unresolved until the Definitions
    # resolve it; the partition goes as a tag, as the sensors' requests do (_compat).
    day = analytics_days.get_last_partition_key()
    return dg.RunRequest(run_key=day, tags={PARTITION_NAME_TAG: day})


# Resources are bound once, for every domain, in ``esper_assets.defs.build_definitions``.
definitions = dg.Definitions(
    assets=ASSETS, jobs=[analytics_daily_job], schedules=[analytics_daily_at_0030]
)
