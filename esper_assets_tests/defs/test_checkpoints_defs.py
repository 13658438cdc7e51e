"""The Dagster checkpoints domain: saves made outside Dagster are reported by the
``new_checkpoints`` sensor as materializations of their run's partition, each with a
``verify_checkpoints`` run of ``checkpoint_restorable``; the landing path ingests
complete directories once. On the embedded default, and on PostgreSQL + moto's S3."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest

from esper_assets.defs import build_definitions
from esper_assets.defs._compat import DATA_VERSION_TAG, PARTITION_NAME_TAG, dagster_private
from esper_assets.defs.checkpoints import checkpoint_runs, new_checkpoints
from esper_assets.defs.checkpoints.assets import RESTORABLE, STEP_TAG
from esper_assets.flows import wiring
from esper_assets.flows.checkpoints import INGESTED_MARK, REJECTED_MARK, Cursor
from esper_assets.settings import Settings
from esper_assets.storage.chunks import object_key
from esper_assets.storage.objects import make_s3_client


@pytest.fixture
def instance(esper_home):
    with dg.instance_for_test() as instance:
        yield instance


def tick(instance, defs, cursor=None) -> dg.SensorResult:
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=defs.resources) as ctx:
        return new_checkpoints(ctx)


def save(settings: Settings, run: str, step: int, payload: bytes = b"weights" * 100, **kw):
    with wiring.open_checkpoints(settings) as store:
        return store.save(run, step, {"model": payload, "optimizer": b"adam" * 50}, **kw)


def split(result: dg.SensorResult):
    materialized = [e for e in result.asset_events if isinstance(e, dg.AssetMaterialization)]
    return materialized, result.run_requests


def record_and_run(instance, defs, result: dg.SensorResult) -> list:
    """What the daemon does with a SensorResult: partitions, events, then the runs; the
    ``checkpoint_restorable`` evaluation of each run."""
    for request in result.dynamic_partitions_requests:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    job = defs.resolve_job_def("verify_checkpoints")
    evaluations = []
    for request in result.run_requests:
        run = job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
        evaluations += [
            e.event_specific_data for e in run.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ]  # fmt: skip
    return evaluations


def test_the_domain_is_part_of_the_location(esper_home):
    defs = build_definitions()
    assert defs.resolve_assets_def("checkpoints").partitions_def == checkpoint_runs
    assert {s.name for s in defs.sensors} >= {"new_blueprints", "new_checkpoints"}
    assert "checkpoints" in defs.resources
    dg.Definitions.validate_loadable(defs)


def test_each_save_is_reported_once_with_readable_metadata(instance, esper_home):
    settings, defs = Settings.from_env(), build_definitions()
    save(settings, "run-a", 10)
    save(settings, "run-a", 20, payload=b"weights" * 100 + b"!")
    save(settings, "run-b", 1)
    first = tick(instance, defs)
    materialized, checked = split(first)
    assert [(m.partition, m.metadata["step"].value) for m in materialized] == [
        ("run-a", 10), ("run-a", 20), ("run-b", 1),
    ]  # fmt: skip
    assert sorted(first.dynamic_partitions_requests[0].partition_keys) == ["run-a", "run-b"]
    meta = materialized[1].metadata
    assert isinstance(meta["repository_id"], dg.TextMetadataValue)
    assert meta["repository_id"].value == "checkpoint:run-a:20"
    assert meta["parent_repository_id"].value == "checkpoint:run-a:10"
    assert meta["components"].value == "model, optimizer"
    assert meta["new_bytes_stored"].value < meta["logical_bytes"].value  # optimizer reused
    assert materialized[1].tags[DATA_VERSION_TAG] != materialized[0].tags[DATA_VERSION_TAG]
    assert [(r.run_key, r.tags[PARTITION_NAME_TAG], r.tags[STEP_TAG]) for r in checked] == [
        ("checkpoint:run-a:10", "run-a", "10"), ("checkpoint:run-a:20", "run-a", "20"),
        ("checkpoint:run-b:1", "run-b", "1"),
    ]  # fmt: skip
    evaluations = record_and_run(instance, defs, first)
    assert [(e.check_name, e.partition, e.passed) for e in evaluations] == [
        (RESTORABLE, "run-a", True), (RESTORABLE, "run-a", True), (RESTORABLE, "run-b", True),
    ]  # fmt: skip
    assert [e.metadata["step"].value for e in evaluations] == [10, 20, 1]
    assert instance.get_latest_materialization_event(dg.AssetKey("checkpoints")) is not None

    quiet = tick(instance, defs, first.cursor)
    assert quiet.asset_events == [] and quiet.run_requests == []
    assert quiet.dynamic_partitions_requests == []
    save(settings, "run-b", 2)
    later = tick(instance, defs, quiet.cursor)
    assert [m.partition for m in split(later)[0]] == ["run-b"]
    assert later.dynamic_partitions_requests == []  # run-b is a partition already
    assert len(later.cursor) < 200


def test_a_corrupted_chunk_fails_the_check_naming_it(instance, esper_home):
    settings = Settings.from_env()
    with wiring.open_checkpoints(settings) as store:
        store.save("run-c", 0, {"model": b"w" * 1000})
        address = store.show("run-c")["components"]["model"]["files"][0]["chunks"][0][0]
    objects = wiring.object_store(settings)
    stored = bytearray(objects.get(object_key(address)))
    stored[-1] ^= 0xFF
    objects.put(object_key(address), bytes(stored))
    defs = build_definitions()
    (check,) = record_and_run(instance, defs, tick(instance, defs))
    assert not check.passed and address in check.description
    assert check.metadata["corrupt"].value == 1


def test_the_partition_tag_is_dagsters():
    assert dagster_private("PARTITION_NAME_TAG") == PARTITION_NAME_TAG


def test_an_unreadable_cursor_looks_at_everything_again():
    assert Cursor.load("not json") == Cursor()
    assert Cursor.load(None) == Cursor()


# -- the landing path ------------------------------------------------------------------
def land(root: Path, run: str, step: str, manifest: object, files: dict[str, bytes]) -> Path:
    step_dir = root / "checkpoints" / run / step
    step_dir.mkdir(parents=True)
    for name, data in files.items():
        (step_dir / name).write_bytes(data)
    if manifest is not None:  # written last, as a producer must
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        (step_dir / "manifest.json").write_text(text)
    return step_dir


def test_landed_directories_are_ingested_once_and_bad_ones_refused(instance, esper_home):
    settings, defs = Settings.from_env(), build_definitions()
    root = Path(settings.landing)
    good = land(root, "ext", "5", {"components": {"model": "m.bin"}, "metrics": {"loss": 0.5}},
                {"m.bin": b"external" * 64})  # fmt: skip
    waiting = land(root, "ext", "6", None, {"m.bin": b"not yet"})
    missing = land(root, "ext", "7", {"components": {"model": "gone.bin"}}, {})
    not_json = land(root, "ext", "8", "{", {})
    bad_step = land(root, "ext", "x1", {"components": {"model": "m.bin"}}, {"m.bin": b"1"})

    first = tick(instance, defs)
    (materialized,) = split(first)[0]
    assert (materialized.partition, materialized.metadata["step"].value) == ("ext", 5)
    assert materialized.metadata["metrics"].value == {"loss": 0.5}
    assert (good / INGESTED_MARK).read_text().strip() == "checkpoint:ext:5"
    assert not (waiting / INGESTED_MARK).exists() and not (waiting / REJECTED_MARK).exists()
    assert "gone.bin" in (missing / REJECTED_MARK).read_text()
    assert "not readable JSON" in (not_json / REJECTED_MARK).read_text()
    assert "step a number" in (bad_step / REJECTED_MARK).read_text()

    again = tick(instance, defs, first.cursor)  # nothing is tried twice
    assert again.asset_events == []
    (waiting / "manifest.json").write_text(json.dumps({"components": {"model": "m.bin"}}))
    done = tick(instance, defs, again.cursor)
    assert [m.metadata["step"].value for m in split(done)[0]] == [6]


def test_folders_landed_on_s3_are_ingested_and_reported_once(instance, esper_home, s3_bucket,
                                                             s3_endpoint):  # fmt: skip
    settings = Settings.from_env({
        "ESPER_HOME": str(esper_home), "ESPER_LANDING": f"s3://{s3_bucket}/drop",
        "AWS_ENDPOINT_URL": s3_endpoint,
    })  # fmt: skip
    client, folder = make_s3_client(s3_endpoint), "drop/checkpoints/remote/3/"
    client.put_object(Bucket=s3_bucket, Key=folder + "m.bin", Body=b"remote" * 100)
    manifest = json.dumps({"components": {"model": "m.bin"}, "metrics": {"loss": 0.1}})
    client.put_object(Bucket=s3_bucket, Key=folder + "manifest.json", Body=manifest.encode())
    client.put_object(Bucket=s3_bucket, Key="drop/checkpoints/remote/4/m.bin", Body=b"wait")
    defs = build_definitions(settings)
    first = tick(instance, defs)
    (materialized,) = split(first)[0]
    assert (materialized.partition, materialized.metadata["step"].value) == ("remote", 3)
    mark = client.get_object(Bucket=s3_bucket, Key=folder + INGESTED_MARK)["Body"].read()
    assert mark == b"checkpoint:remote:3\n"
    assert tick(instance, defs, first.cursor).asset_events == []  # nothing twice; 4 waits


# -- PostgreSQL + S3 ----------------------------------------------------------------------
def test_the_sensor_on_postgres_and_s3(instance, tmp_path, pg_url, s3_bucket, s3_endpoint):
    settings = Settings.from_env({
        "ESPER_HOME": str(tmp_path / "home"), "ESPER_DATABASE_URL": pg_url,
        "ESPER_S3_BUCKET": s3_bucket, "AWS_ENDPOINT_URL": s3_endpoint,
    })  # fmt: skip
    save(settings, "run-s3", 1)
    save(settings, "run-s3", 2, payload=b"other" * 100)
    defs = build_definitions(settings)
    result = tick(instance, defs)
    assert [m.metadata["step"].value for m in split(result)[0]] == [1, 2]
    checked = record_and_run(instance, defs, result)
    assert [c.passed for c in checked] == [True, True]


def test_more_saves_than_a_batch_are_reported_over_several_ticks(instance, esper_home, monkeypatch):
    from esper_assets.flows import checkpoints as flow

    monkeypatch.setattr(flow, "BATCH", 2)
    settings, defs = Settings.from_env(), build_definitions()
    for step in range(5):
        save(settings, "many", step, payload=bytes([step]) * 64)
    steps, cursor = [], None
    for _ in range(4):
        result = tick(instance, defs, cursor)
        steps += [m.metadata["step"].value for m in split(result)[0]]
        cursor = result.cursor
    assert steps == [0, 1, 2, 3, 4]
