"""The checkpoint jobs on the embedded default: retention + garbage collection, and the
platform's own state saved as the run ``platform`` and restored."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from esper_assets.defs import build_definitions
from esper_assets.flows import wiring
from esper_assets.flows.checkpoints import PLATFORM_RUN
from esper_assets.settings import Settings


@pytest.fixture
def instance(esper_home):
    with dg.instance_for_test() as instance:
        yield instance


def test_the_schedules_are_stopped_by_default_and_request_their_jobs(esper_home):
    defs = build_definitions()
    for name, job in (("daily_checkpoint_retention", "checkpoint_retention_job"),
                      ("platform_state_every_30_minutes", "platform_state_job")):  # fmt: skip
        schedule = defs.resolve_schedule_def(name)
        assert schedule.job_name == job
        assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED


def test_retention_keeps_recent_checkpoints_and_gc_frees_no_live_chunk(instance, esper_home):
    settings = Settings.from_env()
    with wiring.open_checkpoints(settings) as store:
        for step in range(7):
            store.save("long", step, {"model": f"step {step}".encode() * 100})
    job = build_definitions().resolve_job_def("checkpoint_retention_job")
    # Every checkpoint is newer than 7 days: the default policy keeps them all.
    result = job.execute_in_process(instance=instance)
    assert result.success
    done = result.output_for_node("apply_checkpoint_retention")
    assert len(done["retention"]["kept"]) == 7 and done["retention"]["archived"] == []
    assert done["gc"]["chunks_deleted"] == 0  # every chunk is live


def test_a_dry_run_changes_nothing(instance, esper_home):
    with wiring.open_checkpoints(Settings.from_env()) as store:
        store.save("short", 0, {"model": b"m" * 100})
    job = build_definitions().resolve_job_def("checkpoint_retention_job")
    config = {"ops": {"apply_checkpoint_retention": {"config": {"dry_run": True}}}}
    result = job.execute_in_process(instance=instance, run_config=config)
    assert result.output_for_node("apply_checkpoint_retention")["gc"]["dry_run"] is True


def test_platform_state_is_a_restorable_run_of_its_own(instance, esper_home, tmp_path: Path):
    settings = Settings.from_env()
    with wiring.open_checkpoints(settings) as store:
        store.save("train", 3, {"model": b"m" * 100})
    job = build_definitions().resolve_job_def("platform_state_job")
    first = job.execute_in_process(instance=instance)
    second = job.execute_in_process(instance=instance)
    assert first.output_for_node("save_platform_state") == f"checkpoint:{PLATFORM_RUN}:0"
    assert second.output_for_node("save_platform_state") == f"checkpoint:{PLATFORM_RUN}:1"
    with wiring.open_checkpoints(settings) as store:
        report = store.restore(PLATFORM_RUN, dest=tmp_path / "state")
        assert report.step == 1
    files = {p.parent.name: json.loads(p.read_bytes()) for p in (tmp_path / "state").rglob("*")
             if p.is_file()}  # fmt: skip
    assert set(files) == {"repository", "cache", "sensors"}
    assert files["repository"]["by_type"]["checkpoint"] >= 2  # train@3, platform@0
    assert "hottest" in files["cache"] and "stats" in files["cache"]
