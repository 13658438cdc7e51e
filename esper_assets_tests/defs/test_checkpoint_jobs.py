"""The checkpoint jobs on the embedded default: retention + garbage collection, and the
platform's own state saved as the run ``platform`` and restored."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from esper_assets.defs import build_definitions
from esper_assets.defs.resources import CheckpointsResource, resources_for
from esper_assets.errors import InvalidInput
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


# -- a policy of the run's own (run config), on the embedded default and PostgreSQL + S3 --
@pytest.fixture(params=["embedded", pytest.param("postgres", marks=pytest.mark.s3)])
def backend(request, esper_home, tmp_path) -> Settings:
    if request.param == "embedded":
        return Settings.from_env()
    return Settings.from_env({
        "ESPER_HOME": str(tmp_path / "pg-home"),
        "ESPER_DATABASE_URL": request.getfixturevalue("pg_url"),
        "ESPER_S3_BUCKET": request.getfixturevalue("s3_bucket"),
        "AWS_ENDPOINT_URL": request.getfixturevalue("s3_endpoint"),
    })  # fmt: skip


def save_steps(settings: Settings, run: str, losses: list[float]) -> None:
    with wiring.open_checkpoints(settings) as store:
        for step, loss in enumerate(losses):
            store.save(run, step, {"model": f"{run} {step} ".encode() * 200},
                       metrics={"loss": loss})  # fmt: skip


def retention_run(settings: Settings, instance, raise_on_error: bool = True, **config):
    job = build_definitions(settings).resolve_job_def("checkpoint_retention_job")
    run_config = {"ops": {"apply_checkpoint_retention": {"config": config}}}
    return job.execute_in_process(
        instance=instance, run_config=run_config, raise_on_error=raise_on_error
    )


def states(settings: Settings) -> dict[str, str]:
    with wiring.open_checkpoints(settings) as store:
        return {row["asset_id"]: row["state"] for row in store.list()}


def ids(run: str, *steps: int) -> list[str]:
    return [f"checkpoint:{run}:{step}" for step in steps]


def test_a_runs_policy_archives_exactly_what_no_rule_keeps(backend, instance):
    save_steps(backend, "a", [1.0] * 8)
    save_steps(backend, "b", [1.0] * 5)
    # Every checkpoint is minutes old: the configured 7 days would keep them all; this
    # run keeps none for age, the last 2 and every third step.
    done = retention_run(backend, instance, keep_newer_than_days=0, keep_last=2, keep_every=3)
    report = done.output_for_node("apply_checkpoint_retention")["retention"]
    archived = ids("a", 1, 2, 4, 5) + ids("b", 1, 2)
    assert sorted(report["archived"]) == sorted(archived) and report["deleted"] == []
    assert sorted(report["kept"]) == sorted(ids("a", 0, 3, 6, 7) + ids("b", 0, 3, 4))
    after = states(backend)
    assert sorted(a for a, state in after.items() if state == "archived") == sorted(archived)
    with wiring.open_checkpoints(backend) as store:  # archived: still restorable
        assert store.verify("a", 2)["ok"] and store.verify("a", 7)["ok"]


def test_a_runs_policy_deletes_all_but_the_best_and_newest(backend, instance):
    save_steps(backend, "c", [0.5, 0.1, 0.4, 0.3, 0.2])
    done = retention_run(backend, instance, from_settings=False, keep_best=1, metric="loss",
                         action="delete", grace_hours=0)  # fmt: skip
    output = done.output_for_node("apply_checkpoint_retention")
    assert sorted(output["retention"]["deleted"]) == ids("c", 0, 2, 3)
    assert sorted(output["retention"]["kept"]) == ids("c", 1, 4)  # best loss, newest step
    assert output["gc"]["chunks_deleted"] > 0  # the deleted steps' own chunks
    with wiring.open_checkpoints(backend) as store:
        assert [row["step"] for row in store.list("c")] == [1, 4]
        assert store.verify("c", 1)["ok"] and store.verify("c", 4)["ok"]


def test_a_dry_run_of_a_runs_policy_reports_and_changes_nothing(backend, instance):
    save_steps(backend, "d", [1.0] * 4)
    before = states(backend)
    done = retention_run(backend, instance, from_settings=False, keep_last=1,
                         action="delete", dry_run=True)  # fmt: skip
    report = done.output_for_node("apply_checkpoint_retention")["retention"]
    assert sorted(report["deleted"]) == ids("d", 0, 1, 2) and report["dry_run"]
    assert states(backend) == before


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"keep_last": -1}, "keep_last must be >= 0, not -1"),
        ({"action": "shred"}, "action must be one of ['archive', 'delete'], not 'shred'"),
        ({"keep_every": 0}, "keep_every must be >= 1, not 0"),
        ({"keep_newer_than_days": -2.0}, "keep_newer_than_days must be >= 0, not -2.0"),
        ({"keep_best": 2}, "keep_best needs metric NAME"),
        ({"metric": "loss"}, "metric is used only with keep_best K"),
        ({"grace_hours": -1.0}, "grace_hours must be a number of hours >= 0"),
    ],
)
def test_bad_run_config_fails_naming_the_field_and_changes_nothing(instance, esper_home,
                                                                   config, named):  # fmt: skip
    settings = Settings.from_env()
    save_steps(settings, "e", [1.0] * 7)
    # The rest of the config alone would archive steps 0-5: the bad field stops it all.
    bad = {"keep_last": 1, "keep_newer_than_days": 0, **config}
    with pytest.raises(InvalidInput, match="op config apply_checkpoint_retention") as failed:
        retention_run(settings, instance, **bad)
    assert named in str(failed.value) and "nothing was changed" in str(failed.value)
    assert set(states(settings).values()) == {"active"}
    assert not retention_run(settings, instance, raise_on_error=False, **bad).success


# -- the configured policy (ESPER_CHECKPOINT_*) reaches the job through its resource ------
def configured(esper_home, **variables: str) -> Settings:
    """Settings as the environment would give them: ESPER_CHECKPOINT_<NAME>=value."""
    env = {f"ESPER_CHECKPOINT_{name.upper()}": value for name, value in variables.items()}
    return Settings.from_env({"ESPER_HOME": str(esper_home), **env})


KEEP_NEWEST_DELETE_REST = {"keep_last": "1", "keep_days": "off", "retention_action": "delete",
                           "gc_grace_hours": "0"}  # fmt: skip


def test_the_configured_policy_is_what_a_run_with_empty_config_applies(instance, esper_home):
    settings = configured(esper_home, **KEEP_NEWEST_DELETE_REST)
    save_steps(settings, "cfg", [1.0] * 3)
    done = retention_run(settings, instance)  # no config: the resource's policy
    output = done.output_for_node("apply_checkpoint_retention")
    assert sorted(output["retention"]["deleted"]) == ids("cfg", 0, 1)
    assert output["retention"]["kept"] == ids("cfg", 2)
    assert output["gc"]["chunks_deleted"] > 0 and output["gc"]["chunks_in_grace"] == 0
    with wiring.open_checkpoints(settings) as store:
        assert [row["step"] for row in store.list("cfg")] == [2]
        assert store.verify("cfg", 2)["ok"]


def test_a_runs_grace_overrides_the_configured_one(instance, esper_home):
    settings = configured(esper_home, **KEEP_NEWEST_DELETE_REST)  # grace 0
    save_steps(settings, "grace", [1.0] * 3)
    output = retention_run(settings, instance, grace_hours=2.0).output_for_node(
        "apply_checkpoint_retention"
    )
    assert sorted(output["retention"]["deleted"]) == ids("grace", 0, 1)
    assert output["gc"]["chunks_deleted"] == 0 and output["gc"]["chunks_in_grace"] > 0


def test_a_runs_config_still_overrides_the_configured_policy(instance, esper_home):
    settings = configured(esper_home, **KEEP_NEWEST_DELETE_REST)
    save_steps(settings, "over", [1.0] * 4)
    # keep_last from the run, action (delete) still from the settings
    output = retention_run(settings, instance, keep_last=3).output_for_node(
        "apply_checkpoint_retention"
    )
    assert output["retention"]["deleted"] == ids("over", 0)
    assert sorted(output["retention"]["kept"]) == ids("over", 1, 2, 3)
    archived = retention_run(settings, instance, keep_last=1, action="archive")
    report = archived.output_for_node("apply_checkpoint_retention")["retention"]
    assert sorted(report["archived"]) == ids("over", 1, 2) and report["deleted"] == []
    assert states(settings) == {"checkpoint:over:1": "archived", "checkpoint:over:2": "archived",
                                "checkpoint:over:3": "active"}  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("keep_last", -1, "keep_last must be an integer >= 0"),
        ("retention_action", "shred", "action must be one of ['archive', 'delete']"),
        ("keep_days", float("nan"), "keep_days must be a number of days >= 0"),
        ("gc_grace_hours", -1.0, "gc_grace_hours must be a number of hours >= 0"),
    ],
)
def test_a_bad_configured_policy_fails_naming_the_resource_and_changes_nothing(
    instance, esper_home, field, value, named
):
    settings = configured(esper_home, **KEEP_NEWEST_DELETE_REST)
    save_steps(settings, "bad", [1.0] * 3)
    held = resources_for(settings)
    checkpoints = CheckpointsResource(
        database=held["database"], object_store=held["object_store"], **{field: value}
    )
    job = build_definitions(settings, checkpoints=checkpoints).resolve_job_def(
        "checkpoint_retention_job"
    )
    with pytest.raises(InvalidInput, match="the checkpoints resource's") as failed:
        job.execute_in_process(instance=instance)
    assert named in str(failed.value) and "ESPER_CHECKPOINT_" in str(failed.value)
    assert set(states(settings).values()) == {"active"}
