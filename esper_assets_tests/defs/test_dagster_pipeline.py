"""The Dagster pipeline on the embedded default: definitions, sensor, assets, checks,
schedules, bad input and lineage. Runs go through a real (temporary) Dagster
instance; storage is the SQLite file and directory under a temporary ESPER_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.defs import build_definitions
from esper_assets.defs._compat import PARTITION_NAME_TAG
from esper_assets.defs.kernels import new_blueprints
from esper_assets.flows import kernels
from esper_assets.flows.arrivals import Cursor
from esper_assets.flows.landing import DirectoryLanding
from esper_assets.runner import backfill, dagster_lineage, land_examples, tick_and_run
from esper_assets.runner.driver import read_cursor
from esper_assets.settings import SERVICE_VARIABLES, Settings
from esper_assets.storage import AssetRepository, PersistentKernelCache

REPO_ROOT = Path(__file__).resolve().parents[2]


def mlp(
    name: str, parent: str | None = None, width: int = 8, version: str = "1.0.0", **extra
) -> bytes:
    doc = {
        "name": name,
        "version": version,
        "tags": ["test"],
        "input_shape": [4],
        "layers": [{"op": "linear", "out_features": width}, {"op": "relu"}],
        **extra,
    }
    if parent:
        doc["parent"] = parent
    return json.dumps(doc).encode()


@pytest.fixture
def instance(esper_home):
    with dg.instance_for_test() as instance:
        yield instance


@pytest.fixture
def landing(esper_home) -> DirectoryLanding:
    return DirectoryLanding(Settings.from_env().landing)


def add_partitions(instance: dg.DagsterInstance, result: dg.SensorResult) -> None:
    """The dynamic partitions a sensor's result asks for, added (and removed) as the
    daemon would (for a sensor evaluated by hand, as tests do)."""
    for request in result.dynamic_partitions_requests or []:
        name, keys = request.partitions_def_name, list(request.partition_keys)
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in keys:
                instance.delete_dynamic_partition(name, key)
        else:
            instance.add_dynamic_partitions(name, keys)


def latest_materialization(instance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1
    ).records
    assert records, f"no materialization of {asset}[{partition}]"
    event = records[0].asset_materialization
    return {"event_tags": event.tags, **{k: v.value for k, v in event.metadata.items()}}


def all_evaluations(instance, run_id: str) -> list:
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    return [record.dagster_event.event_specific_data for record in records]


def check_evaluations(instance, run_id: str) -> dict[str, object]:
    """Each check's evaluation for the run as a whole (the one without a partition)."""
    return {e.check_name: e for e in all_evaluations(instance, run_id) if e.partition is None}


def partition_evaluations(instance, run_id: str) -> list:
    return [e for e in all_evaluations(instance, run_id) if e.partition is not None]


# -- definitions -------------------------------------------------------------------------
@pytest.mark.slow
def test_definitions_load_without_warnings(esper_home):
    code = (
        "import json, warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import dagster as dg\n"
        "    from esper_assets.defs import build_definitions\n"
        "    dg.Definitions.validate_loadable(build_definitions())\n"
        "print(json.dumps([f'{w.category.__name__} at {w.filename}:{w.lineno}: {w.message}'\n"
        "                  for w in caught]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
        env={**_env_without_services(), "ESPER_HOME": str(esper_home)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []  # as the warnings module saw them
    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "blueprints",
        "compiled_kernels",
        "checkpoints",
        "usage_events_daily",
        "kernel_usage_daily",
        "cache_warm_list",
        "retirement_candidates",
        "asset_inventory",
    }
    assert graph.get(dg.AssetKey("compiled_kernels")).parent_keys == {dg.AssetKey("blueprints")}
    checks = {key.name for key in graph.asset_check_keys}
    assert checks == {"blueprint_is_valid", "kernel_round_trip", "checkpoint_restorable",
                      "registered_blueprints_still_valid", "schema", "non_empty",
                      "fresh", "kernel_cache_healthy"}  # fmt: skip
    assert {s.name for s in defs.schedules} == {
        "hourly_cache_maintenance", "warm_cache_every_15_minutes", "nightly_blueprint_revalidation",
        "daily_checkpoint_retention", "platform_state_every_30_minutes", "analytics_daily_at_0030",
        "cache_health_every_15_minutes",
    }  # fmt: skip
    assert {s.name for s in defs.sensors} == {"new_blueprints", "new_checkpoints"}


@pytest.mark.slow
def test_dagster_cli_validates_the_workspace(esper_home):
    from esper_assets.defs.instance import embedded_dagster_home

    def validate(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w",
             "workspace.yaml"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
            env={**_env_without_services(), "ESPER_HOME": str(esper_home),
                 "DAGSTER_HOME": str(embedded_dagster_home()), **env},
        )  # fmt: skip

    result = validate()
    assert result.returncode == 0, result.stdout + result.stderr
    # The exit status is about our code location: one that cannot load fails it,
    # and what is printed names the variable, in our words.
    broken = validate(ESPER_REDIS_URL="ftp://nowhere")
    assert broken.returncode != 0, broken.stdout + broken.stderr
    assert "ESPER_REDIS_URL" in broken.stdout + broken.stderr


def _env_without_services() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}


def test_resources_name_service_variables_and_do_not_hold_their_values(esper_home, monkeypatch):
    monkeypatch.setenv("ESPER_DATABASE_URL", "postgresql://u:hunter2-secret@127.0.0.1:5432/test")
    resources = build_definitions().resources
    assert resources["database"].url == dg.EnvVar("ESPER_DATABASE_URL")
    assert "hunter2" not in repr(resources)


# -- sensor -----------------------------------------------------------------------------
def run_sensor(instance, defs, cursor=None):
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as ctx:
        return new_blueprints(ctx)


def test_sensor_adds_partitions_and_requests_one_run_per_content(instance, landing):
    defs = build_definitions()
    landing.put("alpha.json", mlp("alpha"))
    landing.put(
        "beta.yaml", b"name: beta\nversion: 1.0.0\ninput_shape: [3]\nlayers: [{op: tanh}]\n"
    )
    first = run_sensor(instance, defs)
    assert sorted(r.partition_key for r in first.run_requests) == ["alpha", "beta"]
    assert sorted(first.dynamic_partitions_requests[0].partition_keys) == ["alpha", "beta"]
    for request in first.run_requests:
        assert request.run_key.startswith(f"{request.partition_key}:")
        assert request.tags["esper/file_sha256"] in request.run_key
    quiet = run_sensor(instance, defs, first.cursor)
    assert quiet.run_requests == [] and quiet.dynamic_partitions_requests == []
    landing.put("alpha.json", mlp("alpha", width=16))
    changed = run_sensor(instance, defs, quiet.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["alpha"]
    assert changed.run_requests[0].run_key not in {r.run_key for r in first.run_requests}


def test_sensor_moves_unusable_file_names_aside_and_goes_on(instance, landing):
    defs = build_definitions()
    landing.put("good.json", mlp("good"))
    landing.put("bad name.json", mlp("bad"))
    landing.put(("x" * 200) + ".yaml", b"{}")
    result = run_sensor(instance, defs)
    assert [r.partition_key for r in result.run_requests] == ["good"]
    rejected = landing.folder / "rejected"
    assert (rejected / "bad name.json").read_bytes() == mlp("bad")
    assert "bad name.json" in (rejected / "bad name.json.error.txt").read_text()
    assert (rejected / (("x" * 200) + ".yaml.error.txt")).exists()


def blueprint_partitions(instance) -> list[str]:
    return sorted(instance.get_dynamic_partitions("blueprints"))


def invalid(name: str) -> bytes:
    return mlp(name).replace(b'"relu"', b'"softmax9"')  # an unknown op: never registered


def test_sensor_removes_the_partitions_of_gone_files_that_never_registered(instance, landing):
    """good registers, bad never does; both files are then deleted. bad's partition is
    removed (as the daemon applies the sensor's request); good's stays, with its
    history, and later ticks do not ask about it again until the set changes."""
    defs = build_definitions()
    landing.put("good.json", mlp("good"))
    landing.put("bad.json", invalid("bad"))
    report = tick_and_run(defs, instance)
    assert {r.partitions[0]: r.success for r in report.runs} == {"good": True, "bad": False}
    assert blueprint_partitions(instance) == ["bad", "good"]
    (landing.folder / "good.json").unlink()
    (landing.folder / "bad.json").unlink()

    result = run_sensor(instance, defs, read_cursor(instance, new_blueprints.name))

    [delete] = result.dynamic_partitions_requests
    assert isinstance(delete, dg.DeleteDynamicPartitionsRequest)
    assert list(delete.partition_keys) == ["bad"] and result.run_requests == []
    add_partitions(instance, result)  # what the daemon does with the request
    assert blueprint_partitions(instance) == ["good"]
    assert latest_materialization(instance, "compiled_kernels", "good")["kernel_id"]
    settled = Cursor.load(result.cursor).settled
    assert settled  # the set kept ({good}) is remembered...
    quiet = run_sensor(instance, defs, result.cursor)
    assert quiet.dynamic_partitions_requests == [] and blueprint_partitions(instance) == ["good"]
    assert Cursor.load(quiet.cursor).settled == settled  # ...and not looked up again

    # Another gone name changes the set: it is looked up, removed; good is still kept.
    instance.add_dynamic_partitions("blueprints", ["never_landed"])
    changed = run_sensor(instance, defs, quiet.cursor)
    assert [list(r.partition_keys) for r in changed.dynamic_partitions_requests] == [
        ["never_landed"]
    ]
    # The name lands again: its partition comes back and its run goes ahead.
    landing.put("bad.json", mlp("bad", width=5))
    back = run_sensor(instance, defs, changed.cursor)
    assert [type(r) for r in back.dynamic_partitions_requests] == [
        dg.AddDynamicPartitionsRequest, dg.DeleteDynamicPartitionsRequest,
    ]  # fmt: skip
    assert [list(r.partition_keys) for r in back.dynamic_partitions_requests] == [
        ["bad"], ["never_landed"],
    ]  # fmt: skip
    assert [r.partition_key for r in back.run_requests] == ["bad"]


def test_sensor_does_not_remove_a_partition_that_a_run_in_flight_targets(instance, landing):
    defs = build_definitions()
    landing.put("bad.json", invalid("bad"))
    tick_and_run(defs, instance)
    (landing.folder / "bad.json").unlink()
    cursor = read_cursor(instance, new_blueprints.name)
    during: list[dg.SensorResult] = []

    @dg.op
    def tick_meanwhile(context) -> None:  # (a string annotation is refused)
        during.append(run_sensor(context.instance, defs, cursor))

    @dg.job
    def targets_bad() -> None:
        tick_meanwhile()

    run = targets_bad.execute_in_process(instance=instance, tags={PARTITION_NAME_TAG: "bad"})
    assert run.success
    [meanwhile] = during
    assert meanwhile.dynamic_partitions_requests == []  # a run still targets it
    assert Cursor.load(meanwhile.cursor).settled == ""  # so the next tick looks again
    after = run_sensor(instance, defs, meanwhile.cursor)
    assert [list(r.partition_keys) for r in after.dynamic_partitions_requests] == [["bad"]]


def ingest_job_as_launched() -> dg.JobDefinition:
    """``ingest_blueprints`` as a launched run's worker rebuilds it (``dg.execute_job``)."""
    return build_definitions().resolve_job_def("ingest_blueprints")


def test_an_ingest_run_executes_its_steps_in_the_run_process(instance, landing):
    """The job's own executor (which ``execute_in_process`` would bypass): both steps in
    the run's process, not a process each."""
    landing.put("solo.json", mlp("solo"))
    instance.add_dynamic_partitions("blueprints", ["solo"])
    job = dg.reconstructable(ingest_job_as_launched)
    with dg.execute_job(job, instance, tags={PARTITION_NAME_TAG: "solo"}) as result:
        assert result.success
        run_id = result.run_id
    starts = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
    assert {e.step_key for e in starts} == {"blueprints_and_kernels"}
    assert {e.dagster_event.pid for e in starts} == {os.getpid()}
    checks = {e.check_name for e in check_evaluations(instance, run_id).values()}
    assert checks == {"blueprint_is_valid", "kernel_round_trip"}  # its own checks only


# -- assets and checks ------------------------------------------------------------------
def test_one_partition_end_to_end_with_readable_metadata(instance, landing, esper_home):
    landing.put("base.json", mlp("base", tags=["mlp", "base"]))
    report = tick_and_run(build_definitions(), instance)
    [run] = report.runs
    assert run.success and run.checks == {"blueprint_is_valid": True, "kernel_round_trip": True}
    bp = latest_materialization(instance, "blueprints", "base")
    kernel = latest_materialization(instance, "compiled_kernels", "base")
    assert bp["name"] == "base" and bp["version"] == "1.0.0"
    assert bp["tags"] == "base, mlp"  # the blueprint's own tags field, sorted
    assert bp["file"] == "blueprints/base.json"  # relative to the landing zone
    with AssetRepository.from_env() as repo:
        stored = repo.get_metadata(bp["repository_id"])
        assert stored.properties["content_hash"] == bp["content_hash"]
        assert kernel["blueprint_repository_id"] == bp["repository_id"]
        # registered under its kernel id, so that is its repository id too
        assert repo.get_metadata(kernel["kernel_id"]).parent_id == bp["repository_id"]
    assert kernel["kernel_id"].startswith("k-")
    assert kernel["name"] == "base" and kernel["version"] == "1.0.0"
    assert kernel["parameter_count"] == 4 * 8 + 8
    assert kernel["flops_per_sample"] > 0 and kernel["size_bytes"] > 0
    assert kernel["tiers_written"] == "l1, l3"  # embedded: memory + SQLite
    assert kernel["blueprint_content_hash"] == bp["content_hash"]
    assert kernel["blueprint_run"] == run.run_id  # a link to the run in the UI
    records = instance.fetch_materializations(dg.AssetKey("blueprints"), limit=1).records
    assert records[0].asset_materialization.tags["dagster/data_version"] == bp["content_hash"]
    with PersistentKernelCache.from_env() as cache:
        assert cache.get(kernel["kernel_id"]) is not None
    checks = check_evaluations(instance, run.run_id)
    valid = {k: v.value for k, v in checks["blueprint_is_valid"].metadata.items()}
    assert valid["partitions"] == "base"
    assert "`blueprints/base.json` (base): valid, registered as base@1.0.0" in valid["files"]
    assert "parent registered" in valid["rules"] and "<= 256 layers" in valid["rules"]
    round_trip = {k: v.value for k, v in checks["kernel_round_trip"].metadata.items()}
    assert round_trip["partitions"] == "base"
    assert f"- base: `{kernel['kernel_id']}` passed" in round_trip["kernels"]
    assert "sha256" in round_trip["steps"] and "forward pass" in round_trip["steps"]


# Measurements: plotted by Dagster, each with its unit (or a count) in its name.
MEASUREMENTS = {"parameter_count", "flops_per_sample", "compile_ms", "size_bytes"}
# What a kernel and the checks no longer record: duplicates of other fields (a kernel's
# repository id is its kernel id; its blueprint partition its name), ids that were
# plotted, a hash named like Dagster's data version, counts in place of names.
DROPPED = {"repository_id", "blueprint_partition", "blueprint_event_storage_id",
           "blueprint_data_version", "blueprint_run_id", "kernels_checked", "checked"}  # fmt: skip


def test_metadata_plots_only_measurements_and_repeats_nothing(instance, landing):
    landing.put("base.json", mlp("base"))
    landing.put("child.json", mlp("child", parent="base@1.0.0", width=6))
    report = tick_and_run(build_definitions(), instance)
    assert [r.success for r in report.runs] == [True, True]
    entries = {}
    for asset in ("blueprints", "compiled_kernels"):
        for name in ("base", "child"):
            records = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[name]),
                limit=1,
            ).records
            entries[f"{asset}[{name}]"] = records[0].asset_materialization.metadata
    for run in report.runs:
        for check, evaluation in check_evaluations(instance, run.run_id).items():
            entries[f"{check} of {run.partitions[0]}"] = evaluation.metadata
    numeric = (dg.IntMetadataValue, dg.FloatMetadataValue)
    for where, metadata in entries.items():
        plotted = {k for k, v in metadata.items() if isinstance(v, numeric)}
        assert plotted <= MEASUREMENTS, (where, plotted - MEASUREMENTS)
        if not where.startswith("blueprints["):  # a blueprint keeps its repository_id
            assert not DROPPED & set(metadata), (where, DROPPED & set(metadata))
        values = [
            str(v.value) for v in metadata.values()
            if str(v.value) and not isinstance(v, dg.BoolMetadataValue)
        ]  # fmt: skip
        assert len(values) == len(set(values)), (where, metadata)  # no field repeats another
        assert not any(value.startswith("/") for value in values), where  # no absolute path
    kernel = entries["compiled_kernels[child]"]
    assert {k for k, v in kernel.items() if isinstance(v, numeric)} == MEASUREMENTS
    assert isinstance(kernel["blueprint_run"], dg.DagsterRunMetadataValue)
    assert entries["blueprints[child]"]["repository_version"] == dg.MetadataValue.text("1")
    # lineage: a rendered chain of links (not plotted); a parent is a link to its page
    base_page = "/assets/blueprints?view=partitions&partition=base"
    for where in ("blueprints[child]", "compiled_kernels[child]"):
        assert isinstance(entries[where]["lineage"], dg.MarkdownMetadataValue), where
        assert f"[base@1.0.0]({base_page})" in entries[where]["lineage"].value, where
        assert entries[where]["parent"] == dg.MetadataValue.md(f"[base@1.0.0]({base_page})")
    assert entries["blueprints[base]"]["parent"] == dg.MetadataValue.text("")


def test_materialize_both_assets_for_one_partition(instance, landing):
    from esper_assets.defs.kernels.assets import blueprints_and_kernels

    landing.put("solo.json", mlp("solo", width=12))
    instance.add_dynamic_partitions("blueprints", ["solo"])
    result = dg.materialize(
        [blueprints_and_kernels], partition_key="solo", instance=instance,
        resources=build_definitions().resources,
    )  # fmt: skip
    assert result.success
    assert {e.check_name: e.passed for e in result.get_asset_check_evaluations()} == {
        "blueprint_is_valid": True, "kernel_round_trip": True,
    }  # fmt: skip
    kernel = latest_materialization(instance, "compiled_kernels", "solo")
    assert kernel["parameter_count"] == 4 * 12 + 12
    assert kernel["event_tags"]["dagster/data_version"] == kernel["kernel_id"]


@pytest.mark.slow
def test_a_single_run_backfill_gives_every_partition_its_own_metadata(instance, landing):
    names = [f"bf{i}" for i in range(6)]
    for i, name in enumerate(names):
        landing.put(f"{name}.json", mlp(name, width=4 + i))
    outcome = backfill(build_definitions(), instance, names)
    assert outcome.success and all(outcome.checks.values())
    kernels = {n: latest_materialization(instance, "compiled_kernels", n) for n in names}
    assert len({k["kernel_id"] for k in kernels.values()}) == 6
    assert {k["parameter_count"] for k in kernels.values()} == {4 * w + w for w in range(4, 10)}
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("compiled_kernels"), asset_partitions=names),
        limit=100,
    ).records
    assert sorted(r.partition_key for r in records) == names  # one event per partition
    assert {r.run_id for r in records} == {outcome.run_id} and instance.get_run_ids() == [
        outcome.run_id
    ]


@pytest.mark.slow
def test_a_single_run_backfill_with_one_bad_file_builds_every_other_kernel(instance, landing):
    """Each partition is checked on its own: the bad file gets a failed evaluation for
    its partition and no materialization at all; the good ones are registered and their
    kernels built in the same run; the run's own evaluation names the bad file, and the
    failed blocking check fails the run once the step has finished."""
    good = ["bf_good0", "bf_good1"]
    for width, name in enumerate(good, start=4):
        landing.put(f"{name}.json", mlp(name, width=width))  # different content
    landing.put("bf_bad.json", mlp("bf_bad").replace(b'"relu"', b'"softmax9"'))
    defs = build_definitions()

    failed = backfill(defs, instance, [*good, "bf_bad"])

    assert not failed.success and failed.checks == {
        "blueprint_is_valid": False, "kernel_round_trip": True,
    }  # fmt: skip
    per_partition = {
        (e.check_name, e.partition): e for e in partition_evaluations(instance, failed.run_id)
    }
    assert {k: e.passed for k, e in per_partition.items()} == {
        ("blueprint_is_valid", "bf_good0"): True,
        ("blueprint_is_valid", "bf_good1"): True,
        ("blueprint_is_valid", "bf_bad"): False,
        ("kernel_round_trip", "bf_good0"): True,
        ("kernel_round_trip", "bf_good1"): True,
    }
    bad = per_partition[("blueprint_is_valid", "bf_bad")]
    assert "blueprints/bf_bad.json" in bad.description and "softmax9" in bad.description
    assert "softmax9" in bad.metadata["problems"].value
    summary = check_evaluations(instance, failed.run_id)["blueprint_is_valid"]
    assert "blueprints/bf_bad.json" in summary.description
    assert not any(n in summary.description for n in good)
    checked = {k: v.value for k, v in summary.metadata.items()}
    assert checked["partitions"] == "bf_good0, bf_good1, bf_bad"
    assert checked["invalid_partitions"] == "bf_bad"
    files = checked["files"].splitlines()
    assert files[0].startswith("- `blueprints/bf_good0.json` (bf_good0): valid, registered")
    assert files[2].startswith("- `blueprints/bf_bad.json` (bf_bad): invalid: ")
    for asset in ("blueprints", "compiled_kernels"):  # nothing at all for the bad file
        assert not instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["bf_bad"]),
            limit=1,
        ).records
    registered = {n: latest_materialization(instance, "blueprints", n) for n in good}
    with AssetRepository.from_env() as repo:
        assert [repo.get_metadata(registered[n]["repository_id"]).name for n in good] == good
    for name in good:
        kernel = latest_materialization(instance, "compiled_kernels", name)
        assert kernel["blueprint_repository_id"] == registered[name]["repository_id"]
        assert kernel["event_tags"]["dagster/data_version"] == kernel["kernel_id"]
        assert (
            registered[name]["event_tags"]["dagster/data_version"]
            == (registered[name]["content_hash"])
        )


@pytest.mark.slow
def test_the_same_content_is_never_compiled_twice(instance, landing, esper_home):
    landing.put("base.json", mlp("base"))
    defs = build_definitions()
    tick_and_run(defs, instance)
    landing.put("base.json", mlp("base"))  # touched, same bytes: same run key, no run
    assert tick_and_run(defs, instance).runs == []
    with AssetRepository.from_env() as repo, PersistentKernelCache.from_env() as cache:
        bp_id = kernels.find_blueprint(repo, "base", "1.0.0")
        again = kernels.build_kernel(repo, cache, bp_id)
        assert again.compiled is False
        assert (
            again.kernel_id
            == latest_materialization(instance, "compiled_kernels", "base")["kernel_id"]
        )


@pytest.mark.slow
def test_kernel_round_trip_reports_a_corrupted_cache_entry(instance, landing, esper_home):
    landing.put("base.json", mlp("base"))
    tick_and_run(build_definitions(), instance)
    with AssetRepository.from_env() as repo, PersistentKernelCache.from_env() as cache:
        built = kernels.build_kernel(repo, cache, kernels.find_blueprint(repo, "base", "1.0.0"))
        assert kernels.verify_kernel(cache, built) == []
        cache.put(built.kernel_id, b"not a kernel at all")
        problems = kernels.verify_kernel(cache, built)
        assert any("differ" in p for p in problems) and any("load" in p for p in problems)
    # What the check reports about it: which kernel, the steps, and the problems.
    from esper_assets.defs.kernels.assets import _round_trip_check

    result = _round_trip_check([built], {"base": problems})
    assert not result.passed and "differ" in result.description
    metadata = {k: v.value for k, v in result.metadata.items()}
    assert metadata["failed_partitions"] == "base"
    assert metadata["kernels"].startswith(f"- base: `{built.kernel_id}` failed: ")
    assert "differ" in metadata["problems"] and "cached bytes" in metadata["problems"]


# -- bad input --------------------------------------------------------------------------
BAD_FILES = {
    "malformed JSON": ("broken.json", b'{"name": "broken", "version": '),
    "malformed YAML": ("broken.yaml", b"name: broken\nlayers: [\n  - {op: relu\n"),
    "unknown op": ("weird.json", mlp("weird").replace(b'"relu"', b'"softmax9"')),
    "missing field": (
        "nolayers.json",
        b'{"name": "nolayers", "version": "1.0.0", "input_shape": [4]}',
    ),
    "wrong type": ("wrongtype.json", mlp("wrongtype").replace(b"8", b'"eight"', 1)),
    "inconsistent shapes": (
        "shapes.json",
        mlp("shapes").replace(b'{"op": "relu"}', b'{"op": "residual"}'),
    ),
    "oversized file": ("huge.json", mlp("huge", description="x" * 300_000)),
    "oversized model": ("giant.json", mlp("giant", width=60_000).replace(b"[4]", b"[60000]")),
    "name/stem mismatch": ("stem.json", mlp("other_name")),
    "missing parent": ("orphan.json", mlp("orphan", parent="nobody@1.0.0")),
    "unknown parent version": ("child.json", mlp("child", parent="good@9.9.9")),
    "same content, new name": ("good_copy.json", mlp("good_copy")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_input_fails_its_own_partition_with_a_clear_message(case, instance, landing):
    key, data = BAD_FILES[case]
    landing.put("good.json", mlp("good"))
    defs = build_definitions()
    if case == "same content, new name":
        tick_and_run(defs, instance)  # good registered first
        data = mlp("good").replace(b'"good"', b'"good_copy"')
    landing.put(key, data)
    report = tick_and_run(defs, instance)
    by_partition = {r.partitions[0]: r for r in report.runs}
    name = key.rsplit(".", 1)[0]
    bad = by_partition[name]
    assert not bad.success and bad.checks.get("blueprint_is_valid") is False, bad
    evaluation = check_evaluations(instance, bad.run_id)["blueprint_is_valid"]
    assert key in evaluation.description, evaluation.description
    assert not instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("compiled_kernels"), asset_partitions=[name]),
        limit=1,
    ).records  # no kernel built from a bad file
    if case != "same content, new name":
        assert by_partition["good"].success  # the other file in the same tick went through
    assert (landing.folder / key).read_bytes() == data  # nothing deleted or moved
    assert not instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("blueprints"), asset_partitions=[name]),
        limit=1,
    ).records  # a bad file is not materialized...
    (own,) = [e for e in partition_evaluations(instance, bad.run_id) if e.partition == name]
    assert not own.passed and key in own.description  # ...its partition's check says why
    assert own.metadata["problems"].value


def test_problem_messages_name_the_field(instance, landing):
    landing.put("wrongtype.json", BAD_FILES["wrong type"][1])
    landing.put("shapes.json", BAD_FILES["inconsistent shapes"][1])
    report = tick_and_run(build_definitions(), instance)
    descriptions = {
        r.partitions[0]: check_evaluations(instance, r.run_id)["blueprint_is_valid"].description
        for r in report.runs
    }
    assert "layers[0].out_features" in descriptions["wrongtype"]
    assert "layers[1]" in descriptions["shapes"] and "residual" in descriptions["shapes"]


# -- lineage ----------------------------------------------------------------------------
@pytest.mark.slow
def test_lineage_agrees_across_repository_and_dagster_event_log(instance, esper_home):
    land_examples(DirectoryLanding(Settings.from_env().landing))
    report = tick_and_run(build_definitions(), instance)
    assert len(report.runs) == len(example_blueprint_files()) == 12
    assert all(r.success for r in report.runs), [r for r in report.runs if not r.success]
    with AssetRepository.from_env() as repo:
        lengths = {}
        for path in example_blueprint_files():
            name = path.name.split(".")[0]
            chain = kernels.lineage_chain(repo, name)
            from_dagster = dagster_lineage(instance, name)
            assert [m.asset_id for m in chain] == [s["repository_id"] for s in from_dagster]
            assert [m.name for m in chain[1:]] == [s["partition"] for s in from_dagster[1:]]
            repo_view = repo.get_lineage(chain[0].asset_id, depth=10)["ancestors"]
            assert [m.asset_id for m in repo_view] == [m.asset_id for m in chain[1:]]
            lengths[name] = len(chain)
    assert lengths["residual_mlp_ln_wide"] == 5  # kernel + 4 blueprint versions
    assert lengths["conv_classifier"] == 4
    assert lengths["mlp_base"] == 2


# -- schedules and upkeep jobs ----------------------------------------------------------
def test_every_schedule_requests_its_job(esper_home):
    defs = build_definitions()
    for schedule in defs.schedules:
        with dg.build_schedule_context() as context:
            result = schedule.evaluate_tick(context)
        assert result.run_requests, schedule.name
        assert defs.resolve_job_def(schedule.job_name) is not None


@pytest.mark.slow
def test_warm_job_takes_the_most_used_kernel_first_and_restores_it_when_lost(
    instance, landing, esper_home
):
    """Two kernels read a different number of times; the more used one is then lost
    from every tier. Warming one kernel must pick it (by access count: read it fewer
    times than "cold" and the job warms "cold" instead) and put it back from the asset
    repository; warming both afterwards finds both in the cache."""
    from esper_assets.storage.cache.tiers.objects import kernel_object_key

    # "hot" is above the cache's 1 MiB large-object threshold: L3 keeps a pointer row
    # (with its access count) and the value lives only in the object store (L4).
    landing.put("hot.json", mlp("hot", width=60_000))
    landing.put("cold.json", mlp("cold"))
    defs = build_definitions()
    assert all(run.success for run in tick_and_run(defs, instance).runs)
    hot = latest_materialization(instance, "compiled_kernels", "hot")["kernel_id"]
    cold = latest_materialization(instance, "compiled_kernels", "cold")["kernel_id"]
    with AssetRepository.from_env() as repo:
        hot_bytes = repo.get_asset(hot)[1]
    with PersistentKernelCache.from_env() as cache:
        assert cache.get_entry(hot).in_object_store
        for _ in range(5):
            assert cache.get(hot) == hot_bytes
        for _ in range(2):
            assert cache.get(cold) is not None
    stored = Settings.from_env().objects_dir / kernel_object_key(hot)
    stored.unlink()  # lost: no process holds it in L1 and L4 no longer has it

    warm = defs.resolve_job_def("warm_kernel_cache_job")
    just_one = {"ops": {"warm_most_used_kernels": {"config": {"count": 1}}}}
    first = warm.execute_in_process(instance=instance, run_config=just_one)
    assert first.success
    assert first.output_for_node("warm_most_used_kernels") == {"repository": 1}
    assert stored.exists()
    with PersistentKernelCache.from_env() as cache:
        assert cache.get(hot) == hot_bytes

    both = warm.execute_in_process(instance=instance)
    counts = both.output_for_node("warm_most_used_kernels")
    assert sum(counts.values()) == 2, counts
    assert "missing" not in counts and "repository" not in counts  # both in the cache now


def test_cache_maintenance_job_runs(instance, esper_home):
    result = (
        build_definitions()
        .resolve_job_def("cache_maintenance_job")
        .execute_in_process(instance=instance)
    )
    assert result.success and set(result.output_for_node("clean_kernel_cache")) >= {"l1", "l3"}
