"""The ``new_checkpoints`` sensor: saves made outside Dagster become materializations.

Each tick ingests complete folders from ``ESPER_LANDING/checkpoints/`` (a directory
or an S3 prefix), then
asks the repository for checkpoints registered since its cursor, adds the run
partitions it has not seen and reports, per checkpoint, a materialization of its
run's partition, and requests a ``verify_checkpoints`` run of the
``checkpoint_restorable`` check for it (run key = the checkpoint's asset id; logic
in ``flows/checkpoints``).
"""

import dagster as dg

from esper_assets.defs._compat import PARTITION_NAME_TAG
from esper_assets.defs.checkpoints.assets import (
    STEP_TAG,
    checkpoint_runs,
    materialization,
    verify_checkpoints_job,
)
from esper_assets.defs.resources import CheckpointsResource
from esper_assets.flows import checkpoints as flow
from esper_assets.flows.landing import CheckpointFolders, checkpoint_folders


@dg.sensor(
    job=verify_checkpoints_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Reports each checkpoint saved since the last tick as a materialization of "
    "its run's partition and checks it can be restored; ingests ESPER_LANDING/checkpoints/.",
)
def new_checkpoints(
    context: dg.SensorEvaluationContext, checkpoints: CheckpointsResource
) -> dg.SensorResult:
    with checkpoints.open() as store:
        if checkpoints.landing:
            _ingest(context, store, _landed_folders(checkpoints))
        found, cursor = flow.find_new(store, flow.Cursor.load(context.cursor))
    described = [flow.describe(m) for m in found]
    runs = sorted({d["run"] for d in described})
    has = context.instance.has_dynamic_partition
    new_runs = [r for r in runs if not has(checkpoint_runs.name, r)]
    return dg.SensorResult(
        asset_events=[materialization(d) for d in described],
        run_requests=[
            dg.RunRequest(  # the partition as a tag: see _compat (PARTITION_NAME_TAG)
                run_key=d["asset_id"], tags={PARTITION_NAME_TAG: d["run"], STEP_TAG: str(d["step"])}
            )
            for d in described
        ],
        dynamic_partitions_requests=[checkpoint_runs.build_add_request(new_runs)]
        if new_runs
        else [],
        cursor=cursor.dump(),
    )


def _landed_folders(checkpoints: CheckpointsResource) -> CheckpointFolders:
    """ESPER_LANDING's checkpoints/ folder; on S3 through the code location's bounded
    client (the object store's)."""
    on_s3 = checkpoints.landing.startswith("s3://")
    client = checkpoints.object_store.s3.get_client() if on_s3 else None
    return checkpoint_folders(checkpoints.landing, client)


def _ingest(context: dg.SensorEvaluationContext, store, landing: CheckpointFolders) -> None:
    for landed in flow.ingest_landed(store, landing):
        if landed.error:
            context.log.warning(f"refused {landed.location}: {landed.error}")
        else:
            context.log.info(f"ingested {landed.location} as {landed.asset_id}")
