"""Retention on both backends: each keep rule alone and combined, the newest step
always kept, best-K both ways, dry runs, archive (still restorable) and delete
(a tombstone, never listed, never restorable; later steps still restore)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from esper_assets.checkpoints import RetentionPolicy, apply_retention
from esper_assets.checkpoints.retention import grace_from_settings
from esper_assets.errors import CheckpointExists, CheckpointNotFound, ConfigError, InvalidInput
from esper_assets.settings import Settings

NOTHING = dict(keep_last=None, keep_newer_than=None)  # only the rule a test names
LATER = datetime.now(UTC) + timedelta(days=30)  # every checkpoint is then 30 days old


def save_steps(store, steps, run="r", metrics=None):
    for step in steps:
        m = {"loss": metrics[step]} if metrics else None
        store.save(run, step, {"model": f"weights of {run} {step}".encode() * 50}, metrics=m)


def steps_kept(report):
    return sorted(int(a.rsplit(":", 1)[1]) for a in report.kept)


def listed(store, run="r"):
    return [(r["step"], r["state"]) for r in store.list(run)]


def test_keep_last_alone_archives_the_rest(checkpoints):
    save_steps(checkpoints, [1, 2, 3, 4, 5])
    report = apply_retention(checkpoints, RetentionPolicy(keep_last=2, keep_newer_than=None))
    assert steps_kept(report) == [4, 5]
    assert sorted(report.archived) == [f"checkpoint:r:{s}" for s in (1, 2, 3)]
    assert report.deleted == []
    assert listed(checkpoints) == [(1, "archived"), (2, "archived"), (3, "archived"),
                                   (4, "active"), (5, "active")]  # fmt: skip
    assert "last 2" in report.reasons["checkpoint:r:4"]


def test_keep_every_alone_and_the_newest_always(checkpoints):
    save_steps(checkpoints, [0, 5, 10, 15, 20, 23])
    report = apply_retention(checkpoints, RetentionPolicy(keep_every=10, **NOTHING))
    assert steps_kept(report) == [0, 10, 20, 23]  # 23: the newest
    assert "newest" in report.reasons["checkpoint:r:23"]


def test_keep_newer_than_alone(checkpoints):
    save_steps(checkpoints, [1, 2, 3])
    policy = RetentionPolicy(keep_last=None, keep_newer_than=timedelta(days=7))
    assert steps_kept(apply_retention(checkpoints, policy, dry_run=True)) == [1, 2, 3]
    assert steps_kept(apply_retention(checkpoints, policy, now=LATER)) == [3]


def test_keep_best_lower_and_higher(checkpoints):
    losses = {1: 0.5, 2: 0.1, 3: 0.9, 4: 0.3, 5: 0.7}
    save_steps(checkpoints, losses, metrics=losses)
    lower = RetentionPolicy(keep_best=2, metric="loss", **NOTHING)
    assert steps_kept(apply_retention(checkpoints, lower, dry_run=True)) == [2, 4, 5]
    higher = RetentionPolicy(keep_best=3, metric="loss", higher_is_better=True, **NOTHING)
    assert steps_kept(apply_retention(checkpoints, higher, dry_run=True)) == [1, 3, 5]
    missing = RetentionPolicy(keep_best=2, metric="accuracy", **NOTHING)
    assert steps_kept(apply_retention(checkpoints, missing, dry_run=True)) == [5]


def test_rules_combine_by_any(checkpoints):
    losses = {s: 1.0 / s for s in range(1, 11)}
    losses[2] = 0.0  # the best loss
    save_steps(checkpoints, losses, metrics=losses)
    policy = RetentionPolicy(keep_last=2, keep_every=4, keep_best=1, metric="loss",
                             keep_newer_than=timedelta(days=1))  # fmt: skip
    assert steps_kept(apply_retention(checkpoints, policy, now=LATER)) == [2, 4, 8, 9, 10]


def test_each_run_on_its_own_and_run_filter(checkpoints):
    save_steps(checkpoints, [1, 2, 3], run="a")
    save_steps(checkpoints, [1, 2], run="b")
    policy = RetentionPolicy(keep_last=1, keep_newer_than=None)
    report = apply_retention(checkpoints, policy, run_id="a")
    assert sorted(report.kept) == ["checkpoint:a:3"]
    assert listed(checkpoints, "b") == [(1, "active"), (2, "active")]
    report = apply_retention(checkpoints, policy)
    assert sorted(report.kept) == ["checkpoint:a:3", "checkpoint:b:2"]
    assert report.archived == ["checkpoint:b:1"]  # a's were archived before


def test_dry_run_changes_nothing(checkpoints):
    save_steps(checkpoints, [1, 2, 3])
    before = checkpoints.list("r")
    for action in ("archive", "delete"):
        policy = RetentionPolicy(keep_last=1, keep_newer_than=None, action=action)
        report = apply_retention(checkpoints, policy, dry_run=True)
        assert len(report.archived) + len(report.deleted) == 2 and report.dry_run
    assert checkpoints.list("r") == before
    assert checkpoints.repo.get_audit_log("checkpoint:r:1")[-1]["event"] == "created"


def test_archived_stays_restorable_and_audited(checkpoints, tmp_path):
    save_steps(checkpoints, [1, 2])
    apply_retention(checkpoints, RetentionPolicy(keep_last=1, keep_newer_than=None))
    report = checkpoints.restore("r", 1, dest=tmp_path / "out")
    assert [f.read_bytes() for f in report.files] == [b"weights of r 1" * 50]
    assert checkpoints.verify("r", 1)["ok"]
    event = checkpoints.repo.get_audit_log("checkpoint:r:1")[-1]
    assert event["actor"] == "esper retention" and event["details"]["state"] == "archived"
    assert "no rule keeps it" in event["details"]["properties"]["retention"]["reason"]
    # A second pass archives nothing again.
    again = apply_retention(checkpoints, RetentionPolicy(keep_last=1, keep_newer_than=None))
    assert again.archived == [] and "already archived" in again.reasons["checkpoint:r:1"]


def test_delete_is_a_tombstone_and_later_steps_restore(checkpoints, tmp_path):
    save_steps(checkpoints, [1, 2, 3])
    policy = RetentionPolicy(keep_last=None, keep_every=3, keep_newer_than=None, action="delete")
    report = apply_retention(checkpoints, policy)
    assert sorted(report.deleted) == ["checkpoint:r:1", "checkpoint:r:2"]
    assert listed(checkpoints) == [(3, "active")]
    with pytest.raises(CheckpointNotFound, match="retention deleted it"):
        checkpoints.show("r", 2)
    checkpoints.restore("r", 3, dest=tmp_path / "out")  # its parent (step 2) is gone
    assert checkpoints.verify("r", 3)["ok"]
    events = [e["event"] for e in checkpoints.repo.get_audit_log("checkpoint:r:2")]
    assert events[-2:] == ["deprecated", "updated"]
    reason = checkpoints.repo.get_audit_log("checkpoint:r:2")[-2]["details"]["reason"]
    assert reason.startswith("deleted by retention: no rule keeps it")
    # Deleted ones are no longer candidates: a second pass changes nothing.
    assert apply_retention(checkpoints, policy).deleted == []
    with pytest.raises(CheckpointExists, match="deleted by retention"):
        checkpoints.save("r", 2, {"model": b"again"})


def test_next_step_counts_deleted_steps_whose_ids_stay_taken(checkpoints):
    from esper_assets.checkpoints.retention import delete_checkpoint

    assert checkpoints.next_step("r") == 0
    save_steps(checkpoints, [0, 1, 2])
    delete_checkpoint(checkpoints, "checkpoint:r:2", "a test")
    assert listed(checkpoints) == [(0, "active"), (1, "active")]
    assert checkpoints.next_step("r") == 3  # not 2: that id is the tombstone's
    checkpoints.save("r", checkpoints.next_step("r"), {"model": b"next"})


def test_now_must_be_timezone_aware(checkpoints):
    with pytest.raises(InvalidInput, match="timezone-aware"):
        apply_retention(checkpoints, RetentionPolicy(), now=datetime(2026, 1, 1))


def test_archive_then_delete_by_a_later_policy(checkpoints):
    save_steps(checkpoints, [1, 2])
    apply_retention(checkpoints, RetentionPolicy(keep_last=1, keep_newer_than=None))
    policy = RetentionPolicy(keep_last=1, keep_newer_than=None, action="delete")
    assert apply_retention(checkpoints, policy).deleted == ["checkpoint:r:1"]
    assert listed(checkpoints) == [(2, "active")]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(keep_last=-1), "keep_last"),
        (dict(keep_every=0), "keep_every"),
        (dict(keep_best=-2, metric="loss"), "keep_best"),
        (dict(keep_best=2), "metric"),
        (dict(keep_newer_than=timedelta(days=-1)), "keep_newer_than"),
        (dict(action="shred"), "action"),
    ],
)
def test_bad_policies_are_refused(options, message):
    with pytest.raises(InvalidInput, match=message):
        RetentionPolicy(**options)


def test_from_settings_defaults_and_variables(tmp_path):
    assert RetentionPolicy.from_settings(None) == RetentionPolicy()
    home = {"ESPER_HOME": str(tmp_path)}
    assert RetentionPolicy.from_settings(Settings.from_env(home)) == RetentionPolicy()
    env = {**home, "ESPER_CHECKPOINT_KEEP_LAST": "3", "ESPER_CHECKPOINT_KEEP_EVERY": "100",
           "ESPER_CHECKPOINT_KEEP_DAYS": "off", "ESPER_CHECKPOINT_RETENTION_ACTION": "Delete",
           "ESPER_CHECKPOINT_GC_GRACE_HOURS": "0.5"}  # fmt: skip
    settings = Settings.from_env(env)
    assert RetentionPolicy.from_settings(settings) == RetentionPolicy(
        keep_last=3, keep_every=100, keep_newer_than=None, action="delete"
    )
    assert grace_from_settings(settings) == timedelta(minutes=30)


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ESPER_CHECKPOINT_KEEP_LAST", "-1"),
        ("ESPER_CHECKPOINT_KEEP_LAST", "five"),
        ("ESPER_CHECKPOINT_KEEP_EVERY", "0"),
        ("ESPER_CHECKPOINT_KEEP_DAYS", "nan"),
        ("ESPER_CHECKPOINT_RETENTION_ACTION", "shred"),
        ("ESPER_CHECKPOINT_GC_GRACE_HOURS", "off"),
    ],
)
def test_bad_policy_variables_are_config_errors(tmp_path, variable, value):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({"ESPER_HOME": str(tmp_path), variable: value})
