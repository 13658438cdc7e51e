"""Tick the ``new_checkpoints`` sensor as the daemon would, in process.

Checkpoints are saved outside Dagster (``make demo`` saves one, training processes
save theirs); the sensor finds them, and the daemon records what it returns:
the run partitions it asks for, each checkpoint as a materialization of its run's
partition (``report_runless_asset_event``, the call the daemon makes) and a
``verify_checkpoints`` run per checkpoint. ``tick_checkpoints`` does the same, with
the cursor kept beside the blueprint sensor's (``new_checkpoints.cursor`` in the
instance's folder), so a checkpoint is reported once however often it runs.

``dagster_checkpoint`` reads a checkpoint's materialization back from the event log,
so the demo can show that Dagster holds the step it saved.

The sensor and its job are found by name in the ``Definitions``: the runner imports
``esper_assets.defs`` by its public names only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import dagster as dg

from esper_assets.runner.driver import (
    RunOutcome,
    add_partitions,
    already_ran,
    daemon_tags,
    read_cursor,
    run_job,
    write_cursor,
)
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
    """Tick ``new_checkpoints`` from its stored cursor and record what it returns, until
    a tick reports nothing (the sensor reports a bounded batch per tick)."""
    sensor = defs.resolve_sensor_def(NEW_CHECKPOINTS)
    verify = defs.resolve_job_def(sensor.job_name)
    report = CheckpointTickReport()
    for _ in range(max_ticks):
        result = _evaluate(defs, instance, sensor)
        report.ticks += 1
        add_partitions(instance, result)
        for event in result.asset_events:
            instance.report_runless_asset_event(event)
            report.reported.append(_reported(event))
        # After the events: a crash in between reports them again, which only adds events.
        write_cursor(instance, sensor.name, result.cursor)
        for request in result.run_requests or []:
            if not already_ran(instance, sensor.name, request.run_key):
                tags = daemon_tags(sensor.name, request)
                # the run key is the checkpoint's id: the step this run verifies
                report.runs.append(run_job(verify, instance, [request.run_key], tags))
        if not result.asset_events:
            break
    return report


def _evaluate(
    defs: dg.Definitions, instance: dg.DagsterInstance, sensor: dg.SensorDefinition
) -> dg.SensorResult:
    cursor = read_cursor(instance, sensor.name)
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=defs.resources, sensor_name=sensor.name
    ) as context:
        # What the tick logs (landed folders ingested or refused) stays out of the
        # command's output; their marks in the landing zone say what happened.
        context.log.setLevel(logging.CRITICAL)
        return sensor(context)


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
