"""Tick the ``new_checkpoints`` sensor as the daemon does, when asked.

Checkpoints are saved outside Dagster (``make demo`` saves one, training processes
save theirs); the sensor finds them, and the daemon records what it returns: the run
partitions it asks for, each checkpoint as a materialization of its run's partition
(a runless asset event) and a ``verify_checkpoints`` run per checkpoint.
``tick_checkpoints`` takes those ticks through the daemon's own step on the code
location (``driver.location_daemon``): the ticks are in the sensor's history, the
verify runs are the location's and executed before the tick returns, and the cursor
is Dagster's, so a checkpoint is reported once however often it runs. What a tick
reported is read back from the event log (the ``checkpoints`` materializations after
the last one before the tick).

``dagster_checkpoint`` reads a checkpoint's materialization back from the event log,
so the demo can show that Dagster holds the step it saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from esper_assets.defs import RUN_KEY_TAG
from esper_assets.runner.driver import RunOutcome, launched_run, location_daemon, tick
from esper_assets.runner.lineage import materialization_of

NEW_CHECKPOINTS = "new_checkpoints"
CHECKPOINTS_ASSET = "checkpoints"


@dataclass
class CheckpointTickReport:
    ticks: int = 0
    reported: list[dict] = field(default_factory=list)  # run, step, asset_id per materialization
    runs: list[RunOutcome] = field(default_factory=list)  # the verify runs executed

    @property
    def ok(self) -> bool:
        return all(run.ok for run in self.runs)

    @property
    def checks(self) -> dict[str, bool]:
        """Whether each verified checkpoint is restorable, by asset id (the partition
        ``tick_checkpoints`` runs its verify job on)."""
        return {run.partitions[0]: run.ok for run in self.runs}

    def as_dict(self) -> dict:
        """Plain values for a command's report; ``problems``: why a check failed."""
        return {
            "ticks": self.ticks,
            "reported": self.reported,
            "checks": self.checks,
            "problems": {run.partitions[0]: run.error for run in self.runs if not run.ok},
        }


def tick_checkpoints(
    defs: dg.Definitions, instance: dg.DagsterInstance, max_ticks: int = 20
) -> CheckpointTickReport:
    """Tick ``new_checkpoints`` and execute its verify runs, until a tick reports
    nothing (the sensor reports a bounded batch per tick)."""
    report = CheckpointTickReport()
    with location_daemon(defs, instance) as daemon:
        for _ in range(max_ticks):
            since = _latest_storage_id(instance)
            done = tick(daemon, NEW_CHECKPOINTS)
            report.ticks += 1
            reported = _materialized_after(instance, since)
            report.reported += [_reported(event) for event in reported]
            # the run key is the checkpoint's id: the step this run verifies
            report.runs += [
                launched_run(instance, run_id, [instance.get_run_by_id(run_id).tags[RUN_KEY_TAG]])
                for run_id in done.run_ids
            ]
            if not reported:
                break
    return report


def _latest_storage_id(instance: dg.DagsterInstance) -> int:
    records = instance.fetch_materializations(dg.AssetKey(CHECKPOINTS_ASSET), limit=1).records
    return records[0].storage_id if records else 0


def _materialized_after(
    instance: dg.DagsterInstance, storage_id: int
) -> list[dg.AssetMaterialization]:
    """The ``checkpoints`` materializations recorded after ``storage_id``, oldest first."""
    found, cursor = [], None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(CHECKPOINTS_ASSET), after_storage_id=storage_id
            ),
            limit=1000, cursor=cursor, ascending=True,
        )  # fmt: skip
        found += [record.asset_materialization for record in page.records]
        if not page.has_more:
            return found
        cursor = page.cursor


def _reported(event: dg.AssetMaterialization) -> dict:
    return {
        "run": event.partition,
        "step": event.metadata["step"].value,
        "asset_id": event.metadata["repository_id"].value,
    }


def dagster_checkpoint(instance: dg.DagsterInstance, run_id: str, asset_id: str) -> dict | None:
    """The materialization of ``checkpoints[run_id]`` that names the repository id
    ``asset_id`` (one step of the run), as its metadata; None if Dagster has none."""
    return materialization_of(instance, CHECKPOINTS_ASSET, run_id, repository_id=asset_id)
