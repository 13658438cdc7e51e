"""The ``new_blueprints`` sensor: landed files become partitions and runs; partitions
whose file is gone and that never registered a blueprint are removed."""

import hashlib
from dataclasses import dataclass, field

import dagster as dg

from esper_assets.defs._compat import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)
from esper_assets.defs.kernels.assets import (
    BLUEPRINTS,
    KERNELS,
    blueprint_partitions,
    blueprints_and_kernels,
)
from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    LandingZoneResource,
)
from esper_assets.flows.arrivals import Cursor, scan_landing
from esper_assets.flows.kernels import find_blueprint, has_registered_blueprint
from esper_assets.storage import AssetRepository

# The landing-zone file a run was requested for (a run tag).
FILE_TAG = "esper/file"

# In process: a run's step takes a fraction of a second, while Dagster's default
# (multiprocess) executor starts a Python process per step, each importing Dagster and
# esper_assets again. Timed with one partition per run through ``dg.execute_job`` (the
# job's own executor, as a launched run), 5 runs each, load average 3-4 on 2 cores:
# 5.7-7.3 s a run with a process per step, 0.8-1.5 s in process; the steps themselves
# took 0.1-0.35 s either way (then two steps; now one, blueprints_and_kernels). Runs
# stay separate processes (the run launcher's).
#
# The selection is the two assets with their own checks only: a check another domain
# puts on them (the nightly re-validation of every registered blueprint) is not run
# for every landed file.
ingest_blueprints_job = dg.define_asset_job(
    "ingest_blueprints",
    selection=dg.AssetSelection.assets(BLUEPRINTS, KERNELS).without_checks()
    | dg.AssetSelection.checks(*blueprints_and_kernels.check_keys),
    description="Validate, register and compile blueprints into cached kernels.",
    executor_def=dg.in_process_executor,
)

REMOVAL_POLICY = (
    "A partition is removed when its blueprint name has no file in blueprints/ any more, "
    "no version of that blueprint is in the asset repository (it never passed, e.g. an "
    "invalid file that was deleted) and no queued or running run targets it. A blueprint "
    "that was registered keeps its partition, and with it its history in Dagster, after "
    "its file is gone, as the repository keeps its versions."
)


@dg.sensor(
    job=ingest_blueprints_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches ESPER_LANDING/blueprints/: one partition per blueprint name, one run "
    "per new file content. Unusable file names are moved to rejected/ with a reason. "
    + REMOVAL_POLICY,
)
def new_blueprints(
    context: dg.SensorEvaluationContext,
    landing: LandingZoneResource,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
) -> dg.SensorResult:
    """One tick: landed files become partitions and runs; partitions are removed by the
    policy in ``REMOVAL_POLICY``. What it rejected and which children wait for their
    parent goes to the tick's log (and the cursor keeps the waiting ones)."""
    cursor = Cursor.load(context.cursor)
    partitions = set(context.instance.get_dynamic_partitions(blueprint_partitions.name))
    with repository.open() as repo:
        scan = scan_landing(
            landing.open(),
            cursor,
            lambda name, version: find_blueprint(repo, name, version) is not None,
            blueprint_rules.limits(),
        )
        removal = partitions_to_remove(context.instance, repo, partitions, scan.landed, cursor)
    scan.cursor.settled = removal.settled
    for key, reason, moved_to in scan.rejected:
        context.log.warning(f"rejected {key!r}: {reason} (moved to {moved_to})")
    if scan.waiting:
        context.log.info(f"waiting for parents to be registered: {', '.join(scan.waiting)}")
    if removal.remove:
        context.log.info(
            f"removing partition(s) {', '.join(removal.remove)}: no file in the landing zone "
            "and no blueprint of that name in the repository"
        )
    if removal.deferred:
        context.log.info(
            f"not removing partition(s) {', '.join(removal.deferred)} yet: a queued or "
            "running run targets them"
        )
    new_names = sorted({a.name for a in scan.arrivals} - partitions)
    requests: list = []
    if new_names:
        requests.append(blueprint_partitions.build_add_request(new_names))
    if removal.remove:
        requests.append(blueprint_partitions.build_delete_request(removal.remove))
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=a.run_key,
                partition_key=a.name,
                tags={FILE_TAG: a.key, "esper/file_sha256": a.file_sha256},
            )
            for a in scan.arrivals
        ],
        dynamic_partitions_requests=requests,
        cursor=scan.cursor.dump(),
    )


@dataclass
class Removal:
    """What a tick decided about the partitions whose file is gone."""

    remove: list[str] = field(default_factory=list)  # never registered: removed
    kept: list[str] = field(default_factory=list)  # registered: kept with their history
    deferred: list[str] = field(default_factory=list)  # a run in flight targets them
    settled: str = ""  # for the cursor: the digest of ``kept`` when nothing was deferred


# A run in one of these may still read or write the partition it targets.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def partitions_to_remove(
    instance: dg.DagsterInstance,
    repo: AssetRepository,
    partitions: set[str],
    landed: set[str],
    cursor: Cursor,
) -> Removal:
    """Apply the removal policy to the ``partitions`` whose name is not ``landed``.

    Each such name costs one repository lookup, and one query lists the runs in
    flight; the cursor keeps a digest of the names the last tick kept, so the same
    set (registered blueprints whose files were cleaned up) is not looked up again
    every tick."""
    gone = sorted(partitions - landed)
    if not gone:
        return Removal()
    if _digest(gone) == cursor.settled:
        return Removal(kept=gone, settled=cursor.settled)
    busy = _partitions_in_flight(instance, partitions)
    deferred = [n for n in gone if busy is None or n in busy]
    looked_up = [n for n in gone if n not in deferred]
    kept = [n for n in looked_up if has_registered_blueprint(repo, n)]
    remove = [n for n in looked_up if n not in kept]
    return Removal(remove, kept, deferred, "" if deferred else _digest(kept))


def _partitions_in_flight(instance: dg.DagsterInstance, partitions: set[str]) -> set[str] | None:
    """The blueprint partitions that queued or running runs target; None when one of
    them is a single run over a range of them (a backfill: every partition is busy)."""
    busy: set[str] = set()
    for record in instance.get_run_records(dg.RunsFilter(statuses=IN_FLIGHT)):
        tags = record.dagster_run.tags
        if PARTITION_NAME_TAG in tags:
            busy.add(tags[PARTITION_NAME_TAG])
        ends = {tags.get(ASSET_PARTITION_RANGE_START_TAG), tags.get(ASSET_PARTITION_RANGE_END_TAG)}
        if ends & partitions:
            return None
    return busy


def _digest(names: list[str]) -> str:
    return hashlib.blake2b("\n".join(names).encode(), digest_size=8).hexdigest() if names else ""
