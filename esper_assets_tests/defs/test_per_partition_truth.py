"""Per-partition truth, seen as the Dagster UI sees it: runs over three blueprint
partitions are launched through the instance's run launcher against the code location
that ``dagster dev -w workspace.yaml`` serves (a code server process of its own, the
run in a process it starts), exactly as a single-run backfill's run is (one run, the
partition range in its tags); then Dagster's GraphQL API is asked what the UI shows:
each partition's data version, the kernels' stale status, each partition's check
executions, and which partitions were materialized at all.

Three runs: a..c with c an invalid file; then only ``blueprints`` again, with a's
content changed, b's unchanged and c fixed; then both assets."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql

from esper_assets.blueprints import kernel_id_for, parse_blueprint
from esper_assets.flows.landing import DirectoryLanding
from esper_assets.settings import Settings

pytestmark = pytest.mark.slow  # a code server and three launched runs

WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"
NAMES = ["a_mlp", "b_mlp", "c_mlp"]
RUN_TIMEOUT_S = 180
# The instance launches a submitted run at once (no daemon dequeues it here); the run
# launcher is Dagster's default: a process per run, started by the code server.
LAUNCH_AT_ONCE = {
    "run_coordinator": {"module": "dagster.core.run_coordinator", "class": "DefaultRunCoordinator"}
}

LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchPipelineExecution(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

LOCATION = """
query { repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }
"""

TRUTH = """
query Truth($names: [String!]!) {
  blueprints: assetNodeOrError(assetKey: {path: ["blueprints"]}) {
    ... on AssetNode {
      dataVersionByPartition(partitions: $names)
      assetMaterializations(partitions: $names) { partition runId }
    }
  }
  kernels: assetNodeOrError(assetKey: {path: ["compiled_kernels"]}) {
    ... on AssetNode {
      dataVersionByPartition(partitions: $names)
      staleStatusByPartition(partitions: $names)
      assetMaterializations(partitions: $names) { partition runId }
    }
  }
  validity: assetCheckExecutions(
    assetKey: {path: ["blueprints"]}, checkName: "blueprint_is_valid", limit: 50
  ) { runId partition status evaluation { description } }
  roundTrip: assetCheckExecutions(
    assetKey: {path: ["compiled_kernels"]}, checkName: "kernel_round_trip", limit: 50
  ) { runId partition status }
}
"""


def mlp(name: str, width: int, op: str = "relu") -> bytes:
    doc = {
        "name": name, "version": f"1.0.{width}", "tags": ["truth"], "input_shape": [4],
        "layers": [{"op": "linear", "out_features": width}, {"op": op}],
    }  # fmt: skip
    return json.dumps(doc).encode()


def graphql(workspace, query: str, variables: dict | None = None) -> dict:
    """One query on a request context of its own, as the webserver makes one per request
    (a request context caches what it has read)."""
    result = execute_dagster_graphql(workspace.create_request_context(), query, variables or {})
    assert not result.errors, result.errors
    return result.data


def launch(context, instance: dg.DagsterInstance, assets: list[str] | None = None) -> dg.DagsterRun:
    """One run of ``ingest_blueprints`` over the partition range a..c (optionally only
    ``assets``), launched through the instance, waited for."""
    (repository,) = graphql(context, LOCATION)["repositoriesOrError"]["nodes"]
    selector = {
        "repositoryLocationName": repository["location"]["name"],
        "repositoryName": repository["name"],
        "jobName": "ingest_blueprints",
    }
    if assets:
        selector["assetSelection"] = [{"path": [a]} for a in assets]
    params = {
        "selector": selector,
        "runConfigData": {},
        "executionMetadata": {
            "tags": [
                {"key": "dagster/asset_partition_range_start", "value": NAMES[0]},
                {"key": "dagster/asset_partition_range_end", "value": NAMES[-1]},
            ]
        },
    }
    launched = graphql(context, LAUNCH, {"params": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    run_id = launched["run"]["runId"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (run := instance.get_run_by_id(run_id)).is_finished:
        assert time.monotonic() < deadline, (
            f"run {run_id} still {run.status} after {RUN_TIMEOUT_S} s"
        )
        time.sleep(0.5)
    return run


def by_partition(executions: list[dict], run_id: str) -> dict[str | None, str]:
    return {e["partition"]: e["status"] for e in executions if e["runId"] == run_id}


def test_each_partition_has_its_own_version_check_and_staleness(esper_home):
    settings = Settings.from_env()
    landing = DirectoryLanding(settings.landing)
    files = {
        "a_mlp": mlp("a_mlp", 5),
        "b_mlp": mlp("b_mlp", 6),
        "c_mlp": mlp("c_mlp", 7, op="softmax9"),  # invalid: an unknown op
    }
    for name, data in files.items():
        landing.put(f"{name}.json", data)
    with dg.instance_for_test(overrides=LAUNCH_AT_ONCE) as instance:
        instance.add_dynamic_partitions("blueprints", NAMES)
        with define_out_of_process_workspace(str(WORKSPACE), None, instance) as context:
            # 1. a..c, c invalid: a and b materialized and built, c nothing at all
            first = launch(context, instance)
            assert first.status == dg.DagsterRunStatus.FAILURE  # the blocking check failed
            seen = graphql(context, TRUTH, {"names": NAMES})
            a, b = (parse_blueprint(files[n], source=f"{n}.json") for n in NAMES[:2])
            assert seen["blueprints"]["dataVersionByPartition"] == [
                a.content_hash, b.content_hash, None,
            ]  # fmt: skip
            assert seen["kernels"]["dataVersionByPartition"] == [
                kernel_id_for(a), kernel_id_for(b), None,
            ]  # fmt: skip
            assert seen["kernels"]["staleStatusByPartition"] == ["FRESH", "FRESH", "MISSING"]
            for asset in ("blueprints", "kernels"):
                assert sorted(m["partition"] for m in seen[asset]["assetMaterializations"]) == [
                    "a_mlp", "b_mlp",
                ]  # fmt: skip
            validity = by_partition(seen["validity"], first.run_id)
            assert validity == {
                "a_mlp": "SUCCEEDED", "b_mlp": "SUCCEEDED", "c_mlp": "FAILED",
                None: "FAILED",  # the run as a whole
            }  # fmt: skip
            (c_failed,) = [e for e in seen["validity"] if e["partition"] == "c_mlp"]
            assert "blueprints/c_mlp.json" in c_failed["evaluation"]["description"]
            assert "softmax9" in c_failed["evaluation"]["description"]
            assert by_partition(seen["roundTrip"], first.run_id) == {
                "a_mlp": "SUCCEEDED", "b_mlp": "SUCCEEDED", None: "SUCCEEDED",
            }  # fmt: skip

            # 2. blueprints only: a changed, b the same bytes again, c fixed
            files["a_mlp"] = mlp("a_mlp", 9)
            files["c_mlp"] = mlp("c_mlp", 7)
            for name in ("a_mlp", "b_mlp", "c_mlp"):
                landing.put(f"{name}.json", files[name])
            second = launch(context, instance, assets=["blueprints"])
            assert second.status == dg.DagsterRunStatus.SUCCESS
            seen = graphql(context, TRUTH, {"names": NAMES})
            a, c = (parse_blueprint(files[n], source=f"{n}.json") for n in ("a_mlp", "c_mlp"))
            assert seen["blueprints"]["dataVersionByPartition"] == [
                a.content_hash, b.content_hash, c.content_hash,
            ]  # fmt: skip
            # changed content is stale, unchanged content is not, c has no kernel yet
            assert seen["kernels"]["staleStatusByPartition"] == ["STALE", "FRESH", "MISSING"]

            # 3. both assets: every kernel built from its own blueprint, all fresh
            third = launch(context, instance)
            assert third.status == dg.DagsterRunStatus.SUCCESS
            seen = graphql(context, TRUTH, {"names": NAMES})
            assert seen["kernels"]["dataVersionByPartition"] == [
                kernel_id_for(a), kernel_id_for(b), kernel_id_for(c),
            ]  # fmt: skip
            assert seen["kernels"]["staleStatusByPartition"] == ["FRESH"] * 3
            assert by_partition(seen["validity"], third.run_id) == {
                **{n: "SUCCEEDED" for n in NAMES}, None: "SUCCEEDED",
            }  # fmt: skip
