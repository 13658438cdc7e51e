"""Drive the pipeline without a daemon: ``esper ingest``, the demo (``runner.demo``),
the benchmark and tests use this.

``tick_and_run`` does what ``dagster dev``'s daemon does for the new_blueprints
sensor: evaluate it with its stored cursor, add the partitions it asks for, and
execute its run requests (here in-process, one after another). Runs carry the
sensor's name and run key, as the daemon's would, so a daemon started later does
not run the same file content again. ``backfill`` runs many partitions as one
run (the assets' single-run backfill policy).

Nothing here prints. Every run's events, Dagster's stack traces included, go to
the run's event log (``make dev`` shows them); the caller gets one
:class:`FileOutcome` per landed file, with the problem in one line.

The sensor's cursor is kept in ``new_blueprints.cursor`` in the instance's folder
(not in Dagster's sensor state, which belongs to the daemon).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from esper_assets.defs import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    FILE_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
    blueprint_partitions,
    evaluate_new_blueprints,
    ingest_blueprints_job,
    new_blueprints,
)

# In-process runs report through their results and the event log. Dagster's console
# logger would print every event on stderr, and each failure with its stack trace,
# in between the command's own output: keep it to CRITICAL (nothing in a normal
# failing run). The event log gets every event whatever this level is.
QUIET = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}


@dataclass
class RunOutcome:
    partitions: list[str]
    run_id: str
    success: bool
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""  # what went wrong: a failed check's description, else the innermost error
    file: str = ""  # the landed file the sensor requested this run for

    @property
    def ok(self) -> bool:
        return self.success and all(self.checks.values())


@dataclass
class FileOutcome:
    """One landed file as ``esper ingest`` and the demo report it (one table row)."""

    file: str
    status: str  # success | failed | rejected | waiting
    run_id: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    problem: str = ""  # one line

    @property
    def ok(self) -> bool:
        return self.status == "success"


@dataclass
class TickReport:
    ticks: int = 0
    runs: list[RunOutcome] = field(default_factory=list)
    rejected: list[FileOutcome] = field(default_factory=list)  # moved to rejected/ (or not)
    waiting: list[str] = field(default_factory=list)  # still waiting after the last tick

    def files(self) -> list[FileOutcome]:
        """Every file this report covers, one outcome each: rejected, runs, waiting."""
        runs = [
            FileOutcome(
                run.file or ", ".join(run.partitions),
                "success" if run.ok else "failed",
                run.run_id,
                run.checks,
                one_line(run.error),
            )
            for run in self.runs
        ]
        waiting = [
            FileOutcome(
                key,
                "waiting",
                problem="its parent is in the landing zone but not "
                "registered yet; the next ingest looks again",
            )  # fmt: skip
            for key in self.waiting
        ]
        return [*self.rejected, *runs, *waiting]


def one_line(text: str) -> str:
    """``text`` on one line: its non-empty lines joined by `` | ``."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def read_cursor(instance: dg.DagsterInstance, sensor_name: str) -> str | None:
    """``sensor_name``'s cursor as the runner keeps it: ``<name>.cursor`` in the
    instance's folder (Dagster's own sensor state belongs to the daemon)."""
    path = _cursor_path(instance, sensor_name)
    return path.read_text() if path.exists() else None


def write_cursor(instance: dg.DagsterInstance, sensor_name: str, cursor: str | None) -> None:
    _cursor_path(instance, sensor_name).write_text(cursor or "")


def _cursor_path(instance: dg.DagsterInstance, sensor_name: str) -> Path:
    return Path(instance.root_directory) / f"{sensor_name}.cursor"


def add_partitions(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    """The dynamic partitions a sensor's result asks for, added (and removed) as the
    daemon would."""
    for request in result.dynamic_partitions_requests or []:
        name, keys = request.partitions_def_name, list(request.partition_keys)
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in keys:
                instance.delete_dynamic_partition(name, key)
        else:
            instance.add_dynamic_partitions(name, keys)


def tick_and_run(
    defs: dg.Definitions, instance: dg.DagsterInstance, max_ticks: int = 20
) -> TickReport:
    """Tick the sensor and execute what it requests, until a tick requests nothing new
    and no child waits for its parent."""
    report = TickReport()
    for _ in range(max_ticks):
        result, scan = _tick(defs, instance, read_cursor(instance, new_blueprints.name))
        report.ticks += 1
        report.rejected += [
            FileOutcome(key, "rejected", problem=one_line(f"{reason} (moved to {moved_to})"))
            for key, reason, moved_to in scan.rejected
        ]
        report.waiting = list(scan.waiting)
        add_partitions(instance, result)
        write_cursor(instance, new_blueprints.name, result.cursor)
        requests = [
            r for r in result.run_requests or []
            if not already_ran(instance, new_blueprints.name, r.run_key)
        ]  # fmt: skip
        report.runs += [_run_requested(defs, instance, request) for request in requests]
        if not requests and not scan.waiting:
            break
    return report


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None):
    """One evaluation of the sensor from ``cursor``: its result and what it scanned."""
    with dg.build_sensor_context(
        instance=instance, cursor=cursor, resources=defs.resources,
        sensor_name=new_blueprints.name,
    ) as context:  # fmt: skip
        # What the tick logs (rejections, children waiting) comes back in the scan
        # and is reported per file; not also on the console.
        context.log.setLevel(logging.CRITICAL)
        resources = context.resources
        return evaluate_new_blueprints(
            context, resources.landing, resources.repository, resources.blueprint_rules
        )


def _run_requested(
    defs: dg.Definitions, instance: dg.DagsterInstance, request: dg.RunRequest
) -> RunOutcome:
    """Execute one of the sensor's run requests, tagged as the daemon would tag it."""
    tags = daemon_tags(new_blueprints.name, request)
    outcome = _execute(defs, instance, [request.partition_key], tags)
    outcome.file = request.tags.get(FILE_TAG, "")
    return outcome


def daemon_tags(sensor_name: str, request: dg.RunRequest) -> dict[str, str]:
    """A requested run's tags plus the sensor's name and the run key, as the daemon
    adds them (so a daemon started later skips what already ran)."""
    return {**request.tags, SENSOR_NAME_TAG: sensor_name, RUN_KEY_TAG: request.run_key}


def already_ran(instance: dg.DagsterInstance, sensor_name: str, run_key: str | None) -> bool:
    """Whether a run of ``sensor_name`` with ``run_key`` is in the instance already."""
    if not run_key:
        return False
    tags = {SENSOR_NAME_TAG: sensor_name, RUN_KEY_TAG: run_key}
    return bool(instance.get_run_ids(dg.RunsFilter(tags=tags), limit=1))


def backfill(defs: dg.Definitions, instance: dg.DagsterInstance, names: list[str]) -> RunOutcome:
    """Add ``names`` as partitions (in order) and materialize them all in a single run."""
    existing = set(instance.get_dynamic_partitions(blueprint_partitions.name))
    instance.add_dynamic_partitions(
        blueprint_partitions.name, [n for n in names if n not in existing]
    )
    keys = instance.get_dynamic_partitions(blueprint_partitions.name)
    positions = sorted(keys.index(n) for n in names)
    if positions[-1] - positions[0] + 1 != len(names):
        raise ValueError("a single-run backfill needs partitions that were added together")
    tags = {
        ASSET_PARTITION_RANGE_START_TAG: keys[positions[0]],
        ASSET_PARTITION_RANGE_END_TAG: keys[positions[-1]],
    }
    return _execute(defs, instance, names, tags)


def _execute(
    defs: dg.Definitions, instance: dg.DagsterInstance, partitions: list[str], tags: dict
) -> RunOutcome:
    job = defs.resolve_job_def(ingest_blueprints_job.name)
    single = partitions[0] if len(partitions) == 1 else None
    return run_job(job, instance, partitions, tags, partition_key=single)


def run_job(
    job: dg.JobDefinition,
    instance: dg.DagsterInstance,
    partitions: list[str],
    tags: dict,
    partition_key: str | None = None,
) -> RunOutcome:
    """Execute ``job`` in process, quietly, and report its outcome and check results."""
    result = job.execute_in_process(
        run_config=QUIET, instance=instance, partition_key=partition_key, tags=tags,
        raise_on_error=False,
    )  # fmt: skip
    evaluations = run_evaluations(result.get_asset_check_evaluations())
    checks = {evaluation.check_name: evaluation.passed for evaluation in evaluations}
    # A failed check's description is the reason (file, field, problem); the run's own
    # error then only says that a blocking check failed.
    problems = [
        e.description or f"check {e.check_name} failed" for e in evaluations if not e.passed
    ]
    if not problems and not result.success:
        problems = [_run_error(result)]
    return RunOutcome(partitions, result.run_id, result.success, checks, "\n".join(problems))


def run_evaluations(evaluations: list[dg.AssetCheckEvaluation]) -> list[dg.AssetCheckEvaluation]:
    """Each check's outcome for the run: a check evaluated per partition has one more
    evaluation, without a partition, for the run as a whole; a check evaluated once
    (for one partition or none) has just that one."""
    whole = {e.check_name for e in evaluations if e.partition is None}
    return [e for e in evaluations if e.partition is None or e.check_name not in whole]


def _run_error(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure or event.is_run_failure:
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                return _root_message(error)
    return f"run {result.run_id} failed; its event log says why"


def _root_message(error) -> str:
    """The innermost cause: the user-facing reason, not Dagster's wrapper; the error's
    class without its module (``TierUnavailable: ...``; a ``dg.Failure``'s text alone)."""
    while getattr(error, "cause", None) is not None:
        error = error.cause
    message = error.message.strip()
    qualified, sep, text = message.partition(": ")
    if sep and error.cls_name and qualified.rsplit(".", 1)[-1] == error.cls_name:
        return text if error.cls_name == "Failure" else f"{error.cls_name}: {text}"
    return message
