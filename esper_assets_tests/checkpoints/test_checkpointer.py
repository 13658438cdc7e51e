"""Checkpointer(retention=...) on both backends: saves only when due (injectable
clock), the policy applied to its own run after each save, off the training thread;
a failed retention loses no save and is raised once, on flush; bad arguments refused."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from esper_assets.checkpoints import Checkpointer, RetentionPolicy
from esper_assets.checkpoints import checkpointer as checkpointer_module
from esper_assets.checkpoints import manifest as mf
from esper_assets.checkpoints.store import CHECKPOINT
from esper_assets.errors import (
    CheckpointExists,
    CheckpointNotFound,
    InvalidInput,
    RetentionFailed,
)
from esper_assets.storage.repository import AssetMetadata

EVERY = timedelta(seconds=10)
KEEP_2_DELETE = RetentionPolicy(keep_last=2, keep_newer_than=None, action="delete")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def state(run: str, step: int) -> dict[str, bytes]:
    return {"model": f"weights of {run} at step {step} ".encode() * 40}


def run_loop(saver: Checkpointer, clock: Clock, steps: range, seconds_per_step: float):
    """A training loop: each step calls maybe_save; the steps it started a save at."""
    started = []
    for step in steps:
        if saver.maybe_save(step, state(saver.run_id, step)) is not None:
            started.append(step)
        clock.now += seconds_per_step
    return started


def listed(store, run: str) -> list[int]:
    return [row["step"] for row in store.list(run)]


def test_due_saves_then_retention_keeps_the_last_two(checkpoints):
    clock = Clock()
    saver = Checkpointer(checkpoints, "r", every=EVERY, retention=KEEP_2_DELETE, clock=clock)
    checkpoints.save("other", 0, state("other", 0))  # another run: never touched
    checkpoints.save("other", 1, state("other", 1))
    # 5 s a step, due every 10 s (>=: exactly 10 s later is due): steps 0, 2, 4, 6, 8.
    started = run_loop(saver, clock, range(10), seconds_per_step=5)
    assert started == [0, 2, 4, 6, 8]
    assert [info.step for info in saver.flush()] == started
    assert listed(checkpoints, "r") == [6, 8]
    assert listed(checkpoints, "other") == [0, 1]

    # One report per save; each deletes the step that just fell out of the last two.
    assert [r.deleted for r in saver.retention_reports] == [
        [], [], ["checkpoint:r:0"], ["checkpoint:r:2"], ["checkpoint:r:4"],
    ]  # fmt: skip
    for step in (0, 2, 4):  # tombstones, as apply_retention leaves them
        asset_id = f"checkpoint:r:{step}"
        meta = checkpoints.repo.get_metadata(asset_id)
        assert meta.state == "deprecated" and meta.expires_at is not None
        events = [e["event"] for e in checkpoints.repo.get_audit_log(asset_id)]
        assert events[-2:] == ["deprecated", "updated"]
        with pytest.raises(CheckpointNotFound, match="retention deleted it"):
            checkpoints.show("r", step)
    assert checkpoints.verify("r", 8)["ok"]


def test_without_retention_nothing_is_pruned(checkpoints):
    clock = Clock()
    saver = Checkpointer(checkpoints, "r", every=EVERY, clock=clock)
    assert run_loop(saver, clock, range(6), seconds_per_step=4) == [0, 3]
    saver.flush()
    assert listed(checkpoints, "r") == [0, 3] and saver.retention_reports == []


def test_retention_runs_after_the_save_off_the_training_thread(checkpoints, monkeypatch):
    """maybe_save returns while retention is still held; the report arrives on flush."""
    release, ran_on = threading.Event(), []
    real = checkpointer_module.apply_retention

    def held(*args, **kwargs):
        ran_on.append(threading.current_thread())
        assert release.wait(30), "the test never released retention"
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpointer_module, "apply_retention", held)
    saver = Checkpointer(checkpoints, "r", retention=KEEP_2_DELETE, clock=Clock())
    assert saver.maybe_save(0, state("r", 0)).result().step == 0
    assert saver.retention_reports == []  # still held: nothing waited for it
    release.set()
    saver.flush()
    assert ran_on and ran_on[0] is not threading.current_thread()
    assert [r.kept for r in saver.retention_reports] == [["checkpoint:r:0"]]


def test_a_failed_retention_keeps_the_saves_and_is_raised_once_on_flush(checkpoints):
    """A step saved by a newer esper (manifest version 2): archiving it must read its
    manifest, which this version refuses, so that retention fails; the saves do not."""
    newer = {"format": mf.FORMAT, "version": mf.VERSION + 1, "run": "r", "step": 0}
    checkpoints.repo.create_asset(
        AssetMetadata(asset_type=CHECKPOINT, name="r", version=mf.version_label(0),
                      asset_id="checkpoint:r:0", properties={"run": "r", "step": 0}),
        mf.encode(newer),
    )  # fmt: skip
    clock = Clock()
    policy = RetentionPolicy(keep_last=1, keep_newer_than=None)  # archive what falls out
    saver = Checkpointer(checkpoints, "r", every=EVERY, retention=policy, clock=clock)
    assert run_loop(saver, clock, range(1, 3), seconds_per_step=10) == [1, 2]

    with pytest.raises(RetentionFailed, match=r"run 'r': retention .* step\(s\) \[1\]") as caught:
        saver.flush()
    assert "upgrade esper_assets" in str(caught.value.__cause__)
    assert [info.step for info in saver.saved] == [1, 2]  # no save lost
    assert listed(checkpoints, "r") == [0, 1, 2]
    # The next save's retention went through (step 0 was archived before the failure).
    assert [r.archived for r in saver.retention_reports] == [["checkpoint:r:1"]]
    assert [info.step for info in saver.flush()] == [1, 2]  # reported once


def test_a_failed_save_raises_its_own_error_and_retains_nothing(checkpoints):
    checkpoints.save("r", 0, state("r", 0))  # the step the Checkpointer will try again
    saver = Checkpointer(checkpoints, "r", retention=KEEP_2_DELETE, clock=Clock())
    saver.maybe_save(0, state("r", 0))
    with pytest.raises(CheckpointExists, match="already has a checkpoint at step 0"):
        saver.flush()
    assert saver.saved == [] and saver.retention_reports == []
    assert saver.flush() == []  # raised once


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"retention": {"keep_last": 2}}, "retention must be a RetentionPolicy"),
        ({"every": 30}, "every must be a non-negative timedelta"),
        ({"every": timedelta(seconds=-1)}, "every must be a non-negative timedelta"),
        ({"run_id": "a/b"}, "run id must be printable"),
    ],
)
def test_bad_arguments_are_refused(checkpoints, arguments, message):
    with pytest.raises(InvalidInput, match=message):
        Checkpointer(checkpoints, **{"run_id": "r", **arguments})
