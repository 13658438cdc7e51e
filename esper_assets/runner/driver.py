"""Drive the pipeline as the daemon would, when asked: ``esper ingest``, the demo
(``runner.demo``), the benchmark and tests use this.

``tick_and_run`` ticks the new_blueprints sensor of the code location ``esper_assets``
(module ``esper_assets.defs``, loaded in this process as ``workspace.yaml`` and ``dg
dev`` load it) through the sensor daemon's own step (``defs._compat``, item 6): the
tick is in the sensor's history with its cursor, the partitions it asks for are added,
and each run it requests is created for the location's job (the location's origin and
snapshot: the UI shows it under the sensor, on the timeline, and re-executes it) and
executed before the tick returns, with the job's own executor. A run key already used
launches nothing, so a daemon started later does not run the same content again. The
sensor's cursor is Dagster's (its instigator state, shared with a daemon); a
``<sensor>.cursor`` file an older runner left in the instance's folder is adopted
once. ``backfill`` runs many partitions as one run, in process.

Nothing here prints: the console output of the runs is dropped (every event, stack
traces included, is in each run's event log and each tick's log: ``make dev`` shows
them); the caller gets one :class:`FileOutcome` per landed file, the problem in one line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from esper_assets.defs import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    FILE_TAG,
    PARTITION_NAME_TAG,
    blueprint_partitions,
    daemon_in_process,
    ingest_blueprints_job,
    new_blueprints,
)
from esper_assets.errors import ConfigError, EsperError
from esper_assets.flows.arrivals import Cursor, file_name_problem
from esper_assets.flows.landing import REJECTED, LandingZone
from esper_assets.flows.wiring import landing_zone
from esper_assets.settings import Settings

# The code location as workspace.yaml and [tool.dg.project] name it: runs and ticks are
# matched to the UI's location by this name.
MODULE, LOCATION = "esper_assets.defs", "esper_assets"

# What the daemon's step logs about itself (each tick, each launch); its errors come
# back from the step and are raised.
DAEMON_LOG = logging.getLogger("esper_assets.runner.daemon")
DAEMON_LOG.addHandler(logging.NullHandler())
DAEMON_LOG.propagate = False

# ``backfill``'s in-process run: Dagster's console logger would print every event on
# stderr, in between the command's own output: keep it to CRITICAL. The event log
# gets every event whatever this level is.
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


@contextlib.contextmanager
def location_daemon(defs: dg.Definitions, instance: dg.DagsterInstance) -> Iterator:
    """The location's sensor daemon step over ``instance``'s storage. ``defs`` must be
    the location as Dagster loads it (``build_definitions()`` from this environment):
    its runs record the location's job, so other definitions are refused, not run."""
    with daemon_in_process(instance, MODULE, LOCATION) as daemon:
        job = ingest_blueprints_job.name
        if daemon.job_snapshot_id(job) != defs.resolve_job_def(job).get_job_snapshot_id():
            raise ConfigError(
                f"the runner launches the code location {LOCATION} as Dagster loads it "
                f"(module {MODULE}, ESPER_* from this environment); the definitions "
                f"given are another version of {job} (other settings or resources): "
                "build them with build_definitions() in this environment"
            )
        yield daemon


def tick(daemon, sensor_name: str):  # -> _compat.SensorTick
    """One tick of ``sensor_name`` now; its runs are executed before it returns. The
    runs' console output is dropped (it is in their event logs)."""
    _adopt_cursor_file(daemon, sensor_name)
    with _console_dropped():
        done = daemon.tick_sensor(sensor_name, DAEMON_LOG)
    if done.status == "FAILURE":
        raise EsperError(f"sensor {sensor_name} failed: {_root_message(done.error)}")
    return done


@contextlib.contextmanager
def _console_dropped() -> Iterator[None]:
    """stderr dropped, this process's and its children's (a job whose executor runs each
    step in a subprocess), while a tick's runs print each event there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _adopt_cursor_file(daemon, sensor_name: str) -> None:
    """An older runner kept the cursor in ``<sensor>.cursor`` in the instance's folder:
    it becomes the sensor's cursor if Dagster holds none (so files seen are not run
    again), then the file goes."""
    path = Path(daemon.instance.root_directory) / f"{sensor_name}.cursor"
    if path.exists():
        if daemon.sensor_cursor(sensor_name) is None:
            daemon.set_sensor_cursor(sensor_name, path.read_text() or None)
        path.unlink()


def read_cursor(instance: dg.DagsterInstance, sensor_name: str) -> str | None:
    """``sensor_name``'s cursor as Dagster stores it for the location (None: none yet)."""
    for state in instance.all_instigator_state():
        origin = state.origin.repository_origin.code_location_origin
        if state.instigator_name == sensor_name and origin.location_name == LOCATION:
            return state.instigator_data.cursor if state.instigator_data else None
    return None


def tick_and_run(
    defs: dg.Definitions, instance: dg.DagsterInstance, max_ticks: int = 20
) -> TickReport:
    """Tick new_blueprints and execute what it requests, until a tick launches nothing
    and no child waits for its parent."""
    report = TickReport()
    with location_daemon(defs, instance) as daemon:
        landing = landing_zone(Settings.from_env())  # the location's (checked just above)
        unusable = _unusable(landing)
        for _ in range(max_ticks):
            done = tick(daemon, new_blueprints.name)
            report.ticks += 1
            left = _unusable(landing)
            report.rejected += [_rejected(landing, key) for key in sorted(unusable - left)]
            unusable = left
            report.waiting = sorted(Cursor.load(done.cursor).waiting)
            report.runs += [launched_run(instance, run_id) for run_id in done.run_ids]
            if not done.run_ids and not report.waiting:
                break
    # An unusable name still in blueprints/: moving it to rejected/ failed (the tick's
    # log says why); it is reported each time until someone moves or renames it.
    report.rejected += [
        FileOutcome(key, "rejected", problem=one_line(
            f"{file_name_problem(key)} (not moved to {REJECTED}/: see the sensor's tick log)"
        ))
        for key in sorted(unusable)
    ]  # fmt: skip
    return report


def _unusable(landing: LandingZone) -> set[str]:
    """The files in blueprints/ whose names the sensor rejects (moves to rejected/)."""
    return {f.key for f in landing.list_blueprints() if file_name_problem(f.key)}


def _rejected(landing: LandingZone, key: str) -> FileOutcome:
    """A file the tick moved to rejected/, as the sensor's scan reported it: the reason is
    the one it wrote beside the file (``file_name_problem``), and where it went."""
    moved_to = posixpath.join(landing.location, REJECTED, key)
    return FileOutcome(
        key, "rejected", problem=one_line(f"{file_name_problem(key)} (moved to {moved_to})")
    )


def launched_run(
    instance: dg.DagsterInstance, run_id: str, partitions: list[str] | None = None
) -> RunOutcome:
    """A finished run's outcome from the instance: status, check results and the
    problem, and the landed file it was requested for (default partitions: its own)."""
    run = instance.get_run_by_id(run_id)
    if run is None:
        raise EsperError(f"run {run_id} is not in the Dagster instance")
    partitions = partitions or [run.tags[PARTITION_NAME_TAG]]
    records = instance.get_records_for_run(run_id, of_type={CHECK_EVALUATION, *FAILURES}).records
    events = [r.event_log_entry.dagster_event for r in records]
    evaluations = run_evaluations(
        [e.event_specific_data for e in events if e.event_type == CHECK_EVALUATION]
    )
    checks = {evaluation.check_name: evaluation.passed for evaluation in evaluations}
    success = run.status == dg.DagsterRunStatus.SUCCESS
    # A failed check's description is the reason (file, field, problem); the run's own
    # error then only says that a blocking check failed.
    problems = [
        e.description or f"check {e.check_name} failed" for e in evaluations if not e.passed
    ]
    if not problems and not success:
        problems = [_run_error(run_id, events)]
    return RunOutcome(
        partitions, run_id, success, checks, "\n".join(problems), run.tags.get(FILE_TAG, "")
    )


CHECK_EVALUATION = dg.DagsterEventType.ASSET_CHECK_EVALUATION
FAILURES = {dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE}


def backfill(defs: dg.Definitions, instance: dg.DagsterInstance, names: list[str]) -> RunOutcome:
    """Add ``names`` as partitions (in order) and materialize them all in a single run,
    in process (with ``defs``, whatever settings they were built from)."""
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
    job = defs.resolve_job_def(ingest_blueprints_job.name)
    single = names[0] if len(names) == 1 else None
    result = job.execute_in_process(
        run_config=QUIET, instance=instance, partition_key=single, tags=tags,
        raise_on_error=False,
    )  # fmt: skip
    return launched_run(instance, result.run_id, names)


def run_evaluations(evaluations: list[dg.AssetCheckEvaluation]) -> list[dg.AssetCheckEvaluation]:
    """Each check's outcome for the run: a check evaluated per partition has one more
    evaluation, without a partition, for the run as a whole; a check evaluated once
    (for one partition or none) has just that one."""
    whole = {e.check_name for e in evaluations if e.partition is None}
    return [e for e in evaluations if e.partition is None or e.check_name not in whole]


def _run_error(run_id: str, events: list) -> str:
    for event in events:
        if event.is_step_failure or event.is_run_failure:
            error = getattr(event.event_specific_data, "error", None)
            if error is not None:
                return _root_message(error)
    return f"run {run_id} failed; its event log says why"


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
