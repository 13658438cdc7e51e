"""Drive the pipeline without a daemon: ``esper ingest``, the demo, the benchmark and
tests use this.

``tick_and_run`` does what ``dagster dev``'s daemon does for the new_blueprints
sensor: evaluate it with its stored cursor, add the partitions it asks for, and
execute its run requests (here in-process, one after another). Runs carry the
sensor's name and run key, as the daemon's would, so a daemon started later does
not run the same file content again. ``backfill`` runs many partitions as one
run (the assets' single-run backfill policy).

Nothing here prints. Every run's events, Dagster's stack traces included, go to
the run's event log (``make dev`` shows them); the caller gets one
:class:`FileOutcome` per landed file, with the problem in one line.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
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
    local_instance,
    new_blueprints,
)
from esper_assets.settings import Settings

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


def _cursor_file(instance: dg.DagsterInstance) -> Path:
    return Path(instance.root_directory) / "new_blueprints.cursor"


def tick_and_run(
    defs: dg.Definitions, instance: dg.DagsterInstance, max_ticks: int = 20
) -> TickReport:
    """Tick the sensor and execute what it requests, until a tick requests nothing new
    and no child waits for its parent."""
    report = TickReport()
    cursor_file = _cursor_file(instance)
    for _ in range(max_ticks):
        cursor = cursor_file.read_text() if cursor_file.exists() else None
        with dg.build_sensor_context(
            instance=instance, cursor=cursor, resources=defs.resources,
            sensor_name=new_blueprints.name,
        ) as context:  # fmt: skip
            # What the tick logs (rejections, children waiting) comes back in the scan
            # and is reported per file; not also on the console.
            context.log.setLevel(logging.CRITICAL)
            resources = context.resources
            result, scan = evaluate_new_blueprints(
                context, resources.landing, resources.repository, resources.blueprint_rules
            )
        report.ticks += 1
        report.rejected += [
            FileOutcome(key, "rejected", problem=one_line(f"{reason} (moved to {moved_to})"))
            for key, reason, moved_to in scan.rejected
        ]
        report.waiting = list(scan.waiting)
        for request in result.dynamic_partitions_requests or []:
            instance.add_dynamic_partitions(
                request.partitions_def_name, list(request.partition_keys)
            )
        cursor_file.write_text(result.cursor or "")
        requests = [r for r in result.run_requests or [] if not _already_ran(instance, r.run_key)]
        for request in requests:
            tags = {
                **request.tags,
                SENSOR_NAME_TAG: new_blueprints.name,
                RUN_KEY_TAG: request.run_key,
            }
            outcome = _execute(defs, instance, [request.partition_key], tags)
            outcome.file = request.tags.get(FILE_TAG, "")
            report.runs.append(outcome)
        if not requests and not scan.waiting:
            break
    return report


def _already_ran(instance: dg.DagsterInstance, run_key: str | None) -> bool:
    if not run_key:
        return False
    tags = {SENSOR_NAME_TAG: new_blueprints.name, RUN_KEY_TAG: run_key}
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
    result = job.execute_in_process(
        run_config=QUIET, instance=instance, partition_key=single, tags=tags,
        raise_on_error=False,
    )  # fmt: skip
    evaluations = result.get_asset_check_evaluations()
    checks = {evaluation.check_name: evaluation.passed for evaluation in evaluations}
    # A failed check's description is the reason (file, field, problem); the run's own
    # error then only says that a blocking check failed.
    problems = [
        e.description or f"check {e.check_name} failed" for e in evaluations if not e.passed
    ]
    if not problems and not result.success:
        problems = [_run_error(result)]
    return RunOutcome(partitions, result.run_id, result.success, checks, "\n".join(problems))


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


def dagster_lineage(instance: dg.DagsterInstance, name: str, depth: int = 20) -> list[dict]:
    """The chain kernel -> blueprint version -> parent blueprints, read from Dagster's
    event log alone: each step is the materialization whose recorded repository id the
    previous step names."""
    kernel = _materialization(instance, "compiled_kernels", name)
    if kernel is None:
        return []
    chain = [{"type": "kernel", **kernel}]
    partition, wanted = kernel["blueprint_partition"], kernel["blueprint_repository_id"]
    storage_id = kernel.get("blueprint_event_storage_id")  # the exact event, when recorded
    while partition and len(chain) <= depth:
        found = _materialization(instance, "blueprints", partition, wanted, storage_id)
        if found is None:
            break
        chain.append({"type": "blueprint", **found})
        parent = found.get("parent") or ""
        partition, wanted = parent.partition("@")[0], found.get("parent_repository_id")
        storage_id = None
    return chain


# Older materializations of a partition are read a page at a time, newest first.
_PAGE = 100


def _materialization(
    instance: dg.DagsterInstance,
    asset: str,
    partition: str,
    repository_id: str | None = None,
    storage_id: int | None = None,
) -> dict | None:
    """The newest materialization of ``asset[partition]`` that names a repository id
    (``repository_id`` itself, if given). Usually that is the latest one, fetched alone;
    else older ones are paged through, however many times the partition was
    materialized since. ``storage_id``, when known, is tried first."""

    def found(record) -> dict | None:
        event = record.asset_materialization
        meta = {k: v.value for k, v in event.metadata.items()} if event else {}
        if (
            event
            and event.partition == partition
            and meta.get("repository_id")
            and (repository_id in (None, meta["repository_id"]))
        ):
            return {"partition": partition, "run_id": record.run_id, **meta}
        return None

    key = dg.AssetKey(asset)
    if storage_id is not None:
        exact = dg.AssetRecordsFilter(asset_key=key, storage_ids=[int(storage_id)])
        for record in instance.fetch_materializations(exact, limit=1).records:
            if (hit := found(record)) is not None:
                return hit
    records_filter = dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition])
    cursor, limit = None, 1
    while True:
        page = instance.fetch_materializations(records_filter, limit=limit, cursor=cursor)
        for record in page.records:  # newest first
            if (hit := found(record)) is not None:
                return hit
        if not page.has_more:
            return None
        cursor, limit = page.cursor, _PAGE


def land_examples(landing) -> list[str]:
    """Put the example blueprints in the landing zone (unchanged files are left alone)."""
    from esper_assets.blueprints import example_blueprint_files

    landed = []
    present = {f.key for f in landing.list_blueprints()}
    for path in example_blueprint_files():
        data = path.read_bytes()
        if path.name not in present or landing.read(path.name) != data:
            landing.put(path.name, data)
            landed.append(path.name)
    return landed


def run_ingest(settings: Settings | None = None) -> dict:
    """``esper ingest``: tick the new_blueprints sensor on ``ESPER_LANDING`` and run what
    it asks for, until nothing new is left; one outcome per file."""
    from esper_assets.defs import build_definitions
    from esper_assets.flows.landing import landing_from_location

    settings = settings or Settings.from_env()
    landing = landing_from_location(settings.landing)  # a landing zone we refuse stops here
    with local_instance(settings) as instance:
        report = tick_and_run(build_definitions(), instance)
        files = report.files()
        return {
            "landing": landing.location,
            "dagster_home": instance.root_directory,
            "ticks": report.ticks,
            "files": [asdict(f) for f in files],
            "failed": sum(not f.ok for f in files),
        }


def run_demo(settings: Settings | None = None) -> dict:
    """The README's main command: land the examples, let the sensor and runs do their
    work, and report what happened, the cache's stats and one kernel's lineage."""
    from esper_assets.defs import build_definitions
    from esper_assets.flows.kernels import describe, lineage_chain, registered_kernels
    from esper_assets.flows.landing import landing_from_location
    from esper_assets.storage import AssetRepository, PersistentKernelCache

    settings = settings or Settings.from_env()
    landed = land_examples(landing_from_location(settings.landing))
    defs, instance = build_definitions(), local_instance(settings)
    report = tick_and_run(defs, instance)
    with AssetRepository.from_env() as repo:
        kernels = registered_kernels(repo)
        chains = [lineage_chain(repo, m.name) for m in kernels]
        longest = max(chains, key=len, default=[])
        chain = [describe(m) for m in longest]
    with PersistentKernelCache.from_env() as cache:
        fetched = sum(cache.get(m.properties["kernel_id"]) is not None for m in kernels)
        stats = cache.get_stats(include_sizes=True)
    return {
        "settings": settings.describe(),
        "dagster_home": instance.root_directory,
        "landed": landed,
        "ticks": report.ticks,
        "runs": [vars(r) for r in report.runs],
        "files": [asdict(f) for f in report.files()],
        "kernels_registered": len(kernels),
        "kernels_fetched_from_cache": fetched,
        "lineage": chain,
        "dagster_lineage": dagster_lineage(instance, longest[0].name) if longest else [],
        "stats": stats,
    }
