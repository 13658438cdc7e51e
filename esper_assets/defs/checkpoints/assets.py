"""The ``checkpoints`` asset (one dynamic partition per training run) and its check.

Checkpoints are saved outside Dagster, by training processes, so the asset is an
external ``AssetSpec``: the ``new_checkpoints`` sensor reports each save as a
materialization of its run's partition (:func:`materialization`) and requests a
``verify_checkpoints`` run of ``checkpoint_restorable`` for it, tagged with the step.

Why a run and not an ``AssetCheckEvaluation`` in the sensor's result: Dagster 1.13
stores a run-less evaluation under run id "" and its index is unique on (asset,
check, run id, partition), so the second run-less evaluation of one partition (the
run's next step) fails the tick. A run has its own id.
"""

import warnings

import dagster as dg

from esper_assets.defs._compat import DATA_VERSION_TAG
from esper_assets.defs.resources import CheckpointsResource
from esper_assets.flows import checkpoints as flow

# A partitioned asset check is "preview" in Dagster 1.13; it is what gives each run its
# own check outcome, so we use it on purpose and keep its notice out of every load.
warnings.filterwarnings(
    "ignore", message=".*partitions_def on an AssetCheckSpec.*", category=dg.PreviewWarning
)

checkpoint_runs = dg.DynamicPartitionsDefinition(name="checkpoint_runs")

RESTORABLE = "checkpoint_restorable"
STEP_TAG = "esper/checkpoint_step"  # on a verify run: the step to verify
SAMPLE = 0.1  # fraction of a checkpoint's chunks re-read and re-hashed by the check

checkpoints = dg.AssetSpec(
    "checkpoints",
    partitions_def=checkpoint_runs,
    group_name="esper",
    kinds={"python", "safetensors"},
    description="Training checkpoints (one partition per run), saved by CheckpointStore or "
    "landed under ESPER_LANDING/checkpoints/<run>/<step>/; each save is a materialization.",
)


def materialization(described: dict) -> dg.AssetMaterialization:
    """One saved checkpoint as a materialization of its run's partition; its data
    version is the manifest's checksum, so each step is a new version."""
    return dg.AssetMaterialization(
        asset_key=checkpoints.key,
        partition=described["run"],
        tags={DATA_VERSION_TAG: described["checksum"]},
        metadata=_metadata(described),
    )


def _metadata(d: dict) -> dict:
    ratio = d["dedup_ratio"]
    return _present(
        {
            "step": dg.MetadataValue.int(d["step"]),
            "repository_id": dg.MetadataValue.text(d["asset_id"]),
            "parent_repository_id": dg.MetadataValue.text(d["parent_id"]),
            "logical_bytes": dg.MetadataValue.int(d["logical_bytes"]),
            "new_bytes_stored": dg.MetadataValue.int(d["stored_bytes"]),
            "stored_fraction": dg.MetadataValue.float(float(d["stored_fraction"])),
            "dedup_ratio": dg.MetadataValue.float(float(ratio)) if ratio is not None else None,
            "chunks": dg.MetadataValue.int(d["chunk_count"]),
            "new_chunks": dg.MetadataValue.int(d["new_chunks"]),
            "components": dg.MetadataValue.text(d["components"]),
            "kernels": dg.MetadataValue.text(d["kernels"]),
            "metrics": dg.MetadataValue.json(d["metrics"]),
        }
    )


def _outcome(v: dict) -> dict:
    problems = v.get("error") or "; ".join(
        [f"missing chunk {a}" for a in v["missing"][:5]]
        + [f"corrupt chunk {c['address']}: {c['error']}" for c in v["corrupt"][:5]]
    )
    return {
        "passed": bool(v["ok"]),
        "description": problems[:4000] or None,
        "metadata": _present(
            {
                "step": dg.MetadataValue.int(v["step"]) if v.get("step") is not None else None,
                "chunks": v["chunks"],
                "chunks_verified": v["verified"],
                "missing": len(v["missing"]),
                "corrupt": len(v["corrupt"]),
            }
        ),
    }


def _present(metadata: dict) -> dict:
    """Without the entries that have no value (a first save has no dedup ratio)."""
    return {k: v for k, v in metadata.items() if v is not None}


@dg.asset_check(
    asset=checkpoints.key,
    name=RESTORABLE,
    partitions_def=checkpoint_runs,
    description=f"The step the run is tagged with (else the latest): manifest complete, every chunk present and "
    f"{SAMPLE:.0%} of them re-read and re-hashed.",
)
def checkpoint_restorable(
    context: dg.AssetCheckExecutionContext, checkpoints: CheckpointsResource
) -> dg.AssetCheckResult:
    step = context.run.tags.get(STEP_TAG)
    with checkpoints.open() as store:
        verified = flow.check_restorable(
            store, context.partition_key, int(step) if step else None, SAMPLE
        )
    return dg.AssetCheckResult(**_outcome(verified))


verify_checkpoints_job = dg.define_asset_job(
    "verify_checkpoints",
    selection=dg.AssetSelection.checks(checkpoint_restorable),
    description="Check that a run's checkpoint can be restored (the new_checkpoints sensor "
    "requests one run per saved checkpoint).",
    # One small step: in the run's own process, not a Python process of its own (as
    # ingest_blueprints, whose comment has the measurement).
    executor_def=dg.in_process_executor,
)
