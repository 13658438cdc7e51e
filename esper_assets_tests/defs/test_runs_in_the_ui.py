"""The runs and ticks the README's commands make are the code location's own, as the
UI sees it: the demo's pipeline part (the 12 examples landed, ``tick_and_run``), then
Dagster's GraphQL API against the location ``dagster dev -w workspace.yaml`` serves (a
code server of its own) answers as it does for the UI's views: the sensor's runs and
tick history, the Overview timeline's query, and re-execution of one run."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from dagster_graphql.test.utils import define_out_of_process_workspace, execute_dagster_graphql

from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.defs import build_definitions, local_instance
from esper_assets.flows.landing import DirectoryLanding
from esper_assets.runner import land_examples, tick_and_run
from esper_assets.settings import Settings

pytestmark = pytest.mark.slow  # the 12 examples through the pipeline, a code server

WORKSPACE = Path(__file__).resolve().parents[2] / "workspace.yaml"
LOCATION, REPOSITORY, JOB = "esper_assets", "__repository__", "ingest_blueprints"
EXAMPLES = len(example_blueprint_files())

# The sensor's page: its Runs tab and its tick history.
SENSOR = """
query Sensor($selector: SensorSelector!) {
  sensorOrError(sensorSelector: $selector) {
    __typename
    ... on Sensor { sensorState { status runs(limit: 100) { runId }
                                  ticks(limit: 100) { status runIds } } }
    ... on PythonError { message }
  }
}"""
# The Overview timeline: CompletedRunTimelineQuery and its RunTimelineFragment as the UI
# (dagster-webserver 1.13) sends them; a run goes in the row of the job its
# repositoryOrigin and pipelineName name, among the workspace's jobs.
TIMELINE = """
query CompletedRunTimelineQuery($completedFilter: RunsFilter!, $limit: Int!) {
  completed: runsOrError(filter: $completedFilter, limit: $limit) {
    ... on Runs { results { id pipelineName externalJobSource tags { key value }
                            repositoryOrigin { id repositoryName repositoryLocationName }
                            status creationTime startTime endTime updateTime } }
  }
  workspaceOrError { ... on Workspace { locationEntries { name locationOrLoadError {
    ... on RepositoryLocation { repositories { name pipelines { name isJob } } } } } } }
}"""
# Re-execute: the run's snapshot against the location's current job, then the mutation.
SNAPSHOTS = """
query Snapshots($runId: ID!, $job: PipelineSelector!) {
  runOrError(runId: $runId) { ... on Run { pipelineSnapshotId parentPipelineSnapshotId } }
  pipelineOrError(params: $job) { ... on Pipeline { pipelineSnapshotId } }
}"""
REEXECUTE = """
mutation Reexecute($params: ReexecutionParams!) {
  launchPipelineReexecution(reexecutionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId parentRunId repositoryOrigin { repositoryLocationName } } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConflict { message }
  }
}"""
SENSOR_SELECTOR = {
    "repositoryLocationName": LOCATION, "repositoryName": REPOSITORY,
    "sensorName": "new_blueprints",
}  # fmt: skip
JOB_SELECTOR = {
    "repositoryLocationName": LOCATION,
    "repositoryName": REPOSITORY,
    "pipelineName": JOB,
}


@pytest.fixture
def demo_pipeline(esper_home):
    """The demo's pipeline part on the embedded instance: its instance, the driver's
    report, when it started, and the location as ``dagster dev`` serves it."""
    settings = Settings.from_env()
    land_examples(DirectoryLanding(settings.landing))
    started = time.time()
    with local_instance(settings) as instance:
        report = tick_and_run(build_definitions(settings), instance)
        assert len(report.runs) == EXAMPLES == 12 and report.waiting == []
        assert all(run.ok for run in report.runs), [r for r in report.runs if not r.ok]
        with define_out_of_process_workspace(str(WORKSPACE), None, instance) as workspace:
            yield instance, report, started, workspace


def ask(workspace, query: str, variables: dict | None = None) -> dict:
    """One GraphQL query on a fresh request context (a request context caches)."""
    result = execute_dagster_graphql(workspace.create_request_context(), query, variables)
    assert not result.errors, result.errors
    return result.data


def sensor_state(workspace) -> dict:
    sensor = ask(workspace, SENSOR, {"selector": SENSOR_SELECTOR})["sensorOrError"]
    assert sensor["__typename"] == "Sensor", sensor
    return sensor["sensorState"]


def test_the_sensors_runs_and_ticks_are_under_the_sensor_and_on_the_timeline(demo_pipeline):
    instance, report, started, workspace = demo_pipeline
    made = {run.run_id for run in report.runs}
    state = sensor_state(workspace)
    assert state["status"] == "RUNNING"
    assert {run["runId"] for run in state["runs"]} == made  # the sensor's Runs tab
    ticks = state["ticks"]
    assert len(ticks) == report.ticks
    assert {run_id for tick in ticks for run_id in tick["runIds"]} == made
    assert all(tick["status"] in ("SUCCESS", "SKIPPED") for tick in ticks), ticks

    done = ["SUCCESS", "FAILURE", "CANCELED"]
    data = ask(workspace, TIMELINE, {
        "completedFilter": {"statuses": done, "updatedAfter": started - 1}, "limit": 100,
    })  # fmt: skip
    timeline = {run["id"]: run for run in data["completed"]["results"]}
    assert made <= set(timeline)
    for run_id in made:
        run = timeline[run_id]
        assert run["pipelineName"] == JOB and run["status"] == "SUCCESS"
        assert run["repositoryOrigin"]["repositoryLocationName"] == LOCATION, run
        assert run["repositoryOrigin"]["repositoryName"] == REPOSITORY, run
    [entry] = [e for e in data["workspaceOrError"]["locationEntries"] if e["name"] == LOCATION]
    [repository] = entry["locationOrLoadError"]["repositories"]
    assert repository["name"] == REPOSITORY
    assert {"name": JOB, "isJob": True} in repository["pipelines"]  # the row the runs go in

    # Again at once: the same contents run nothing (run keys), and the tick is taken now
    # (not 30 s later), in the same history.
    again = tick_and_run(build_definitions(), instance)
    assert again.runs == [] and again.ticks == 1
    after = sensor_state(workspace)
    assert len(after["ticks"]) == len(ticks) + 1
    assert after["ticks"][0] == {"status": "SKIPPED", "runIds": []}
    assert {run["runId"] for run in after["runs"]} == made


def test_a_run_is_reexecuted_from_the_ui_as_the_same_version(demo_pipeline):
    instance, report, _, workspace = demo_pipeline
    parent = report.runs[0].run_id
    snapshots = ask(workspace, SNAPSHOTS, {"runId": parent, "job": JOB_SELECTOR})
    run = snapshots["runOrError"]
    current = snapshots["pipelineOrError"]["pipelineSnapshotId"]
    # The UI warns "may be a different version" when these differ.
    assert (run["parentPipelineSnapshotId"] or run["pipelineSnapshotId"]) == current

    launched = ask(workspace, REEXECUTE, {
        "params": {"parentRunId": parent, "strategy": "ALL_STEPS"},
    })["launchPipelineReexecution"]  # fmt: skip
    assert launched["__typename"] == "LaunchRunSuccess", launched
    child = launched["run"]
    assert child["parentRunId"] == parent
    assert child["repositoryOrigin"]["repositoryLocationName"] == LOCATION
    assert instance.get_run_by_id(child["runId"]).tags["dagster/parent_run_id"] == parent
