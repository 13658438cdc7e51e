"""The analytics domain through Dagster: part of the code location, one day materialized
by the project's job on a temporary ESPER_HOME with every check passing and the
metadata the UI shows; an empty day; a corrupt file skipped and named; a late file
failing the freshness check."""

from __future__ import annotations

from datetime import UTC, date, datetime

import dagster as dg

from esper_assets.analytics import rollups
from esper_assets.defs import build_definitions
from esper_assets.defs._compat import PARTITION_NAME_TAG
from esper_assets.defs.analytics.assets import ASSETS, analytics_days, fresh_check
from esper_assets.defs.resources import resources_for
from esper_assets.flows import wiring
from esper_assets.settings import Settings
from esper_assets_tests.analytics.test_rollups import a_day_of_use, row, write_file

DAY = date(2026, 11, 5)
PARTITION = DAY.isoformat()
NAMES = ["usage_events_daily", "kernel_usage_daily", "cache_warm_list",
         "retirement_candidates", "asset_inventory"]  # fmt: skip


def materialized(result) -> dict[str, dict]:
    """Each asset's materialization metadata, as plain values."""
    return {
        name: {k: v.value for k, v in result.asset_materializations_for_node(name)[0].metadata.items()}
        for name in NAMES
    }  # fmt: skip


def checks(result) -> dict[tuple[str, str], bool]:
    return {
        (e.asset_key.to_user_string(), e.check_name): e.passed
        for e in result.get_asset_check_evaluations()
    }


def test_the_domain_is_part_of_the_location(esper_home):
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    assert {dg.AssetKey(n) for n in NAMES} <= set(graph.get_all_asset_keys())
    assert len([k for k in graph.asset_check_keys if k.asset_key.path[0] in NAMES]) == 12
    job = defs.resolve_job_def("analytics_daily")
    assert job.partitions_def.get_first_partition_key() == "2026-11-01"
    schedule = defs.resolve_schedule_def("analytics_daily_at_0030")
    assert schedule.job_name == "analytics_daily"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_a_day_materializes_through_the_job_with_every_check_passing(esper_home):
    settings = Settings.from_env()
    store = wiring.object_store(settings)
    a_day_of_use(store)
    corrupt = "usage/events/date=2026-11-05/hour=04/h9-1-000000.parquet"
    store.put(corrupt, b"PAR1 but not really")

    job = build_definitions(settings).resolve_job_def("analytics_daily")
    result = job.execute_in_process(
        partition_key=PARTITION, instance=dg.DagsterInstance.ephemeral()
    )

    assert result.success
    assert checks(result) and all(checks(result).values()), checks(result)
    meta = materialized(result)
    events = meta["usage_events_daily"]
    assert (events["dagster/row_count"], events["files"], events["skipped_files"]) == (7, 2, 1)
    assert corrupt in events["skipped"]
    usage = meta["kernel_usage_daily"]
    assert (usage["requests"], usage["kernels"]) == (110, 2)
    assert usage["hit_rate_l2"] == 100 / 110 and usage["hit_rate_l1"] == 6 / 110
    assert usage["p99_us_max"] == 10_000  # k-a's single miss
    assert "| k-b | l2 | 100 |" in usage["top_kernels"]
    assert "| 1 | k-b |" in meta["cache_warm_list"]["top_kernels"]
    assert meta["retirement_candidates"]["dagster/row_count"] == 0
    assert meta["asset_inventory"]["assets"] == 0
    written = store.get(rollups.daily_key("kernel_usage", DAY))
    assert written is not None


def test_an_empty_day_materializes_empty_with_checks_passing(esper_home):
    settings = Settings.from_env()
    result = dg.materialize(ASSETS, partition_key=PARTITION, resources=resources_for(settings))
    assert result.success
    assert all(checks(result).values()) and len(checks(result)) == 12
    assert {n: m["dagster/row_count"] for n, m in materialized(result).items()} == dict.fromkeys(
        NAMES, 0
    )


def test_a_file_landing_after_the_rollup_read_the_day_fails_freshness(esper_home):
    store = wiring.object_store(Settings.from_env())
    write_file(store, DAY, 0, [row("k-a", "l1", 1)])
    done = rollups.kernel_usage_daily(store, DAY)
    key = dg.AssetKey("kernel_usage_daily")
    assert fresh_check(store, key, DAY, done).passed

    write_file(store, DAY, 23, [row("k-a", "l1", 1)], seq=1)

    late = fresh_check(store, key, DAY, done)
    assert not late.passed and "1 usage file(s) of 2026-11-05 arrived after" in late.description


def test_the_schedule_asks_for_the_newest_complete_day(esper_home):
    defs = build_definitions()
    schedule = defs.resolve_schedule_def("analytics_daily_at_0030")
    with dg.build_schedule_context() as context:
        (request,) = schedule.evaluate_tick(context).run_requests
    day = request.tags[PARTITION_NAME_TAG]
    assert day == analytics_days.get_last_partition_key() and request.run_key == day
    assert date.fromisoformat(day) < datetime.now(UTC).date()  # never today's, still open
