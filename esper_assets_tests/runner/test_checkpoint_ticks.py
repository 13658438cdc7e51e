"""The runner ticks ``new_checkpoints`` as the daemon would: each checkpoint saved
outside Dagster becomes one materialization of its run's partition in the embedded
instance's event log, with a verify run; the sensor's cursor, kept by Dagster, means a
second tick (or a second process) reports nothing again. The demo shows its checkpoint
in Dagster at the step it saved."""

from __future__ import annotations

import dagster as dg
import pytest

from esper_assets.defs import RUN_KEY_TAG, SENSOR_NAME_TAG, build_definitions, local_instance
from esper_assets.flows import wiring
from esper_assets.runner import dagster_checkpoint, run_demo, tick_checkpoints
from esper_assets.runner.driver import location_daemon, read_cursor
from esper_assets.settings import Settings


def save(settings: Settings, run: str, step: int) -> str:
    with wiring.open_checkpoints(settings) as store:
        return store.save(run, step, {"model": bytes([step]) * 512}).asset_id


def materialized_steps(instance: dg.DagsterInstance, run: str) -> list[int]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("checkpoints"), asset_partitions=[run]),
        limit=100,
    ).records
    return sorted(r.asset_materialization.metadata["step"].value for r in records)


def verify_runs(instance: dg.DagsterInstance) -> list[str]:
    runs = instance.get_runs(dg.RunsFilter(tags={SENSOR_NAME_TAG: "new_checkpoints"}))
    return sorted(run.tags[RUN_KEY_TAG] for run in runs)


def test_each_save_is_materialized_once_across_ticks_and_processes(esper_home):
    settings = Settings.from_env()
    defs = build_definitions(settings)
    save(settings, "train", 0)
    save(settings, "train", 1)
    with local_instance(settings) as instance:
        first = tick_checkpoints(defs, instance)
        assert [(r["run"], r["step"]) for r in first.reported] == [("train", 0), ("train", 1)]
        assert first.ok and len(first.runs) == 2
        assert all(run.checks == {"checkpoint_restorable": True} for run in first.runs)
        assert "train" in instance.get_dynamic_partitions("checkpoint_runs")
    with local_instance(settings) as instance:  # a later process: the cursor is on disk
        assert tick_checkpoints(defs, instance).reported == []
        save(settings, "train", 2)
        later = tick_checkpoints(defs, instance)
        assert [r["step"] for r in later.reported] == [2]
        assert materialized_steps(instance, "train") == [0, 1, 2]
        assert verify_runs(instance) == [f"checkpoint:train:{s}" for s in (0, 1, 2)]
        recorded = dagster_checkpoint(instance, "train", "checkpoint:train:1")
        assert recorded["step"] == 1 and recorded["repository_id"] == "checkpoint:train:1"
        assert dagster_checkpoint(instance, "train", "checkpoint:train:9") is None


def test_without_its_cursor_the_sensor_reports_again_but_runs_nothing_twice(esper_home):
    settings = Settings.from_env()
    defs = build_definitions(settings)
    save(settings, "again", 0)
    with local_instance(settings) as instance:
        tick_checkpoints(defs, instance)
        with location_daemon(defs, instance) as daemon:  # the cursor lost
            daemon.set_sensor_cursor("new_checkpoints", None)
        repeated = tick_checkpoints(defs, instance)
        assert [r["step"] for r in repeated.reported] == [0]  # the cursor is what stops this
        assert repeated.runs == []  # the verify run's key is taken
        assert verify_runs(instance) == ["checkpoint:again:0"]


def test_the_blueprint_sensors_cursor_is_left_alone(esper_home):
    settings = Settings.from_env()
    save(settings, "apart", 0)
    with local_instance(settings) as instance:
        tick_checkpoints(build_definitions(settings), instance)
        assert read_cursor(instance, "new_checkpoints").startswith("{")
        assert read_cursor(instance, "new_blueprints") is None


@pytest.mark.slow  # runs the whole demo twice: 10-30 s
def test_the_demo_checkpoint_is_in_dagster_at_the_saved_step_once(esper_home):
    settings = Settings.from_env()
    first = run_demo(settings)["checkpoint"]
    assert first["step"] == 0 and first["reported_to_dagster"] == 1
    assert first["dagster_agrees"] and first["dagster"]["partition"] == "demo"
    assert first["dagster"]["repository_id"] == "checkpoint:demo:0"
    assert first["restorable_checks"] == {"checkpoint:demo:0": True}
    second = run_demo(settings)["checkpoint"]
    assert second["step"] == 1 and second["reported_to_dagster"] == 1  # step 0 not again
    assert second["dagster"]["step"] == 1 and second["dagster_agrees"]
    with local_instance(settings) as instance:
        assert materialized_steps(instance, "demo") == [0, 1]
