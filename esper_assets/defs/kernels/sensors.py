"""The ``new_blueprints`` sensor: landed files become partitions and runs."""

import dagster as dg

from esper_assets.defs.kernels.assets import blueprint_partitions, blueprints, compiled_kernels
from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    LandingZoneResource,
)
from esper_assets.flows.arrivals import Cursor, Scan, scan_landing
from esper_assets.flows.kernels import find_blueprint

# The landing-zone file a run was requested for (a run tag).
FILE_TAG = "esper/file"

# In process: a run's two steps take a fraction of a second, while Dagster's default
# (multiprocess) executor starts a Python process per step, each importing Dagster and
# esper_assets again. Timed with one partition per run through ``dg.execute_job`` (the
# job's own executor, as a launched run), 5 runs each, load average 3-4 on 2 cores:
# 5.7-7.3 s a run with a process per step, 0.8-1.5 s in process; the steps themselves
# took 0.1-0.35 s either way. Runs stay separate processes (the run launcher's).
#
# The selection is the two assets with their own checks only: a check another domain
# puts on them (the nightly re-validation of every registered blueprint) is not run
# for every landed file.
ingest_blueprints_job = dg.define_asset_job(
    "ingest_blueprints",
    selection=dg.AssetSelection.assets(blueprints, compiled_kernels).without_checks()
    | dg.AssetSelection.checks(*blueprints.check_keys, *compiled_kernels.check_keys),
    description="Validate, register and compile blueprints into cached kernels.",
    executor_def=dg.in_process_executor,
)


@dg.sensor(
    job=ingest_blueprints_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Watches ESPER_LANDING/blueprints/: one partition per blueprint name, one run "
    "per new file content. Unusable file names are moved to rejected/ with a reason.",
)
def new_blueprints(
    context: dg.SensorEvaluationContext,
    landing: LandingZoneResource,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
) -> dg.SensorResult:
    return evaluate_new_blueprints(context, landing, repository, blueprint_rules)[0]


def evaluate_new_blueprints(
    context: dg.SensorEvaluationContext,
    landing: LandingZoneResource,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
) -> tuple[dg.SensorResult, Scan]:
    """One tick of ``new_blueprints``: what it returns to Dagster, and the scan behind it
    (rejected files, children waiting), which ``esper ingest`` reports file by file."""
    with repository.open() as repo:
        scan = scan_landing(
            landing.open(),
            Cursor.load(context.cursor),
            lambda name, version: find_blueprint(repo, name, version) is not None,
            blueprint_rules.limits(),
        )
    for key, reason, moved_to in scan.rejected:
        context.log.warning(f"rejected {key!r}: {reason} (moved to {moved_to})")
    if scan.waiting:
        context.log.info(f"waiting for parents to be registered: {', '.join(scan.waiting)}")
    names = sorted({a.name for a in scan.arrivals})
    has = context.instance.has_dynamic_partition
    new_names = [n for n in names if not has(blueprint_partitions.name, n)]
    result = dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=a.run_key,
                partition_key=a.name,
                tags={FILE_TAG: a.key, "esper/file_sha256": a.file_sha256},
            )
            for a in scan.arrivals
        ],
        dynamic_partitions_requests=[blueprint_partitions.build_add_request(new_names)]
        if new_names
        else [],
        cursor=scan.cursor.dump(),
    )
    return result, scan
