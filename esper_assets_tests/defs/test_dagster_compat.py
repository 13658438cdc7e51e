"""esper_assets/defs/_compat.py against the installed Dagster: every private touch is
still where _compat expects it, has the shape it uses, and its public fallback works.

A failure names the _compat item and what to do after a Dagster upgrade. These are
small standalone assets on temporary instances (no ESPER services needed).
"""

import inspect
import logging
import traceback
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from esper_assets.defs import _compat
from esper_assets.defs.instance import instance_yaml

UPGRADE = (
    "Dagster moved something esper_assets/defs/_compat.py relies on. Item {item}: {what}. "
    "Fix that item in _compat.py (and only there), or drop it for its public fallback "
    "(named in its docstring) and re-measure."
)


def moved(item: str, what: str) -> str:
    return UPGRADE.format(item=item, what=what)


def private(name: str, item: str):
    """Dagster's private ``name`` where _compat.PRIVATE_NAMES says it is, or a failure."""
    try:
        return _compat.dagster_private(name)
    except (ImportError, AttributeError) as exc:
        pytest.fail(moved(item, f"{_compat.PRIVATE_NAMES[name]}.{name} is gone ({exc})"))


# -- a tiny partitioned asset, like esper's: single-run backfill, each partition reported
# with its own metadata and data version --------------------------------------------------
partitions = dg.DynamicPartitionsDefinition(name="compat_parts")
seen: dict[str, object] = {}
VERSIONS: dict[str, str] = {}  # partition -> the data version compat_asset reports


@dg.asset(
    partitions_def=partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    code_version="1",
    output_required=False,
)
def compat_asset(context: dg.AssetExecutionContext):
    seen["partition_keys"] = list(context.partition_keys)
    for key in context.partition_keys:
        yield dg.AssetMaterialization(
            asset_key=context.asset_key,
            partition=key,
            metadata={"name": key, "size": len(key)},
            tags=_compat.data_version_tags(VERSIONS.get(key, f"v-{key}"), "1"),
        )


@dg.asset(
    partitions_def=partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    code_version="1",
    deps=[compat_asset],
    output_required=False,
)
def compat_child(context: dg.AssetExecutionContext):
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=compat_asset.key, asset_partitions=context.partition_keys),
        limit=100,
    ).records
    latest = {}
    for record in records:  # newest first
        latest.setdefault(record.partition_key, record)
    for key, record in latest.items():
        upstream = record.asset_materialization.tags[_compat.DATA_VERSION_TAG]
        yield dg.AssetMaterialization(
            asset_key=context.asset_key,
            partition=key,
            tags=_compat.data_version_tags(
                f"child-{upstream}", "1", inputs={compat_asset.key: (upstream, record.storage_id)}
            ),
        )


compat_defs = dg.Definitions(
    assets=[compat_asset, compat_child],
    jobs=[
        dg.define_asset_job("compat_job", [compat_asset]),
        dg.define_asset_job("compat_child_job", [compat_child]),
    ],
)
job = compat_defs.resolve_job_def("compat_job")


def run(instance: dg.DagsterInstance, keys: list[str], job=job) -> dg.ExecuteInProcessResult:
    instance.add_dynamic_partitions(
        partitions.name, [k for k in keys if not instance.has_dynamic_partition(partitions.name, k)]
    )
    seen.clear()
    if len(keys) == 1:
        result = job.execute_in_process(instance=instance, partition_key=keys[0])
    else:
        tags = {
            _compat.ASSET_PARTITION_RANGE_START_TAG: keys[0],
            _compat.ASSET_PARTITION_RANGE_END_TAG: keys[-1],
        }
        result = job.execute_in_process(instance=instance, tags=tags)
    assert result.success
    return result


def stored_metadata(instance: dg.DagsterInstance, key: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=compat_asset.key, asset_partitions=[key]), limit=1
    ).records
    assert records, f"no materialization of compat_asset[{key}]"
    event = records[0].asset_materialization
    return {
        "tags": dict(event.tags),
        "metadata": {k: v.value for k, v in event.metadata.items()},
    }


@pytest.fixture
def instance():
    with dg.instance_for_test() as instance:
        yield instance


# -- 1. run tags --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    [
        "SENSOR_NAME_TAG",
        "RUN_KEY_TAG",
        "ASSET_PARTITION_RANGE_START_TAG",
        "ASSET_PARTITION_RANGE_END_TAG",
        "DATA_VERSION_TAG",
        "PARTITION_NAME_TAG",
        "CODE_VERSION_TAG",
        "DATA_VERSION_IS_USER_PROVIDED_TAG",
        "INPUT_DATA_VERSION_TAG_PREFIX",
        "INPUT_EVENT_POINTER_TAG_PREFIX",
    ],
)
def test_run_tags_are_dagsters(name):
    theirs = private(name, f"1 (run tag {name})")
    assert getattr(_compat, name) == theirs, moved(
        f"1 (run tag {name})",
        f"Dagster now uses {theirs!r}, _compat says {getattr(_compat, name)!r}; runs and "
        "events stored before the upgrade carry the old value",
    )


def test_range_tags_make_one_run_over_the_range(instance):
    run(instance, ["a", "b", "c"])
    assert seen["partition_keys"] == ["a", "b", "c"], moved(
        "1 (ASSET_PARTITION_RANGE_*_TAG)",
        f"a run tagged with the range a..c saw partitions {seen['partition_keys']}",
    )


def test_data_version_tag_is_on_the_materialization(instance):
    run(instance, ["solo"])
    assert stored_metadata(instance, "solo")["tags"].get(_compat.DATA_VERSION_TAG) == "v-solo", (
        moved("1 (DATA_VERSION_TAG)", "a materialization's data version is not under this tag")
    )


def test_sensor_name_tag_is_the_one_dagster_gives_sensor_runs():
    sensor = dg.SensorDefinition(name="compat_sensor", evaluation_fn=lambda _: None, job=job)
    assert dg.DagsterRun.tags_for_sensor(sensor) == {_compat.SENSOR_NAME_TAG: "compat_sensor"}, (
        moved("1 (SENSOR_NAME_TAG)", "Dagster tags a sensor's runs differently")
    )


# -- 2. data-version tags on reported materializations ------------------------------------
def test_reported_tags_are_the_ones_dagster_writes_and_reads(instance):
    """The input tags are named as Dagster names them for an upstream asset key."""
    data_version = private("DATA_VERSION_TAG", "2 (data_version_tags)")
    tags = _compat.data_version_tags("v", "1", inputs={dg.AssetKey(["a", "b"]): ("u", 7)})
    module = _compat.private_module("INPUT_DATA_VERSION_TAG_PREFIX")
    key = dg.AssetKey(["a", "b"])
    assert tags == {
        data_version: "v",
        private("CODE_VERSION_TAG", "2"): "1",
        private("DATA_VERSION_IS_USER_PROVIDED_TAG", "2"): "true",
        module.get_input_data_version_tag(key): "u",
        module.get_input_event_pointer_tag(key): "7",
    }, moved("2 (data_version_tags)", "Dagster names the input tags differently")
    run(instance, ["solo"])
    assert stored_metadata(instance, "solo")["tags"][_compat.DATA_VERSION_TAG] == "v-solo"


def test_reported_versions_drive_dagsters_staleness(instance):
    """Dagster's own stale status (the UI's) follows the reported versions per
    partition, after a run over several partitions: unchanged content is never stale,
    changed content always is, and only in its own partition."""
    resolver = private("get_stale_status_resolver", "2 (data_version_tags)")
    child = compat_defs.resolve_job_def("compat_child_job")

    def status() -> dict[str, str]:
        stale = resolver(instance, [compat_asset, compat_child])
        return {k: stale.get_status(compat_child.key, k).value for k in ("a", "b", "c")}

    VERSIONS.clear()
    run(instance, ["a", "b", "c"])
    run(instance, ["a", "b", "c"], child)
    assert status() == {"a": "FRESH", "b": "FRESH", "c": "FRESH"}
    run(instance, ["a", "b", "c"])  # the same versions again
    assert status() == {"a": "FRESH", "b": "FRESH", "c": "FRESH"}, moved(
        "2 (data_version_tags)", "an unchanged data version made its child stale"
    )
    VERSIONS["b"] = "v-b2"
    run(instance, ["a", "b", "c"])
    assert status() == {"a": "FRESH", "b": "STALE", "c": "FRESH"}, moved(
        "2 (data_version_tags)", "a new data version did not make its own child stale"
    )
    run(instance, ["b"], child)
    assert status()["b"] == "FRESH"
    VERSIONS.clear()


# -- 3. the embedded event log: a subclass of ConsolidatedSqliteEventLogStorage -----------
def test_embedded_event_log_hooks_exist():
    parent = private("ConsolidatedSqliteEventLogStorage", "3 (EmbeddedEventLogStorage's parent)")
    timeout = private("SQLITE_BUSY_TIMEOUT_SECONDS", "3 (EmbeddedEventLogStorage's busy timeout)")
    assert isinstance(timeout, (int, float)) and timeout > 0
    assert issubclass(_compat.EmbeddedEventLogStorage, parent)
    assert "_connect" in vars(parent), moved(
        "3 (EmbeddedEventLogStorage)",
        "ConsolidatedSqliteEventLogStorage no longer defines _connect",
    )
    for hook in ("run_connection", "index_connection"):
        assert "self._connect()" in inspect.getsource(getattr(parent, hook)), moved(
            "3 (EmbeddedEventLogStorage)",
            f"ConsolidatedSqliteEventLogStorage.{hook} no longer goes through _connect, so the "
            "pooled engine is bypassed",
        )
    for name in ("_esper_engine", "_esper_pooled_engine"):
        assert not hasattr(parent, name), f"Dagster now defines {name}: rename ours"


def test_embedded_event_log_keeps_one_engine(tmp_path: Path, monkeypatch):
    module = _compat.private_module("ConsolidatedSqliteEventLogStorage")
    (tmp_path / "dagster.yaml").write_text(instance_yaml(tmp_path))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        storage = instance.event_log_storage
        assert type(storage) is _compat.EmbeddedEventLogStorage
        assert isinstance(storage._conn_string, str), moved(
            "3 (EmbeddedEventLogStorage)", "the parent has no _conn_string"
        )
        run(instance, ["warm"])
        # Every connection the parent opens for reads and writes must come from the
        # pooled engine: through _connect (ours). Its has_table still opens an engine
        # per call (known, ~0.7 ms each); any other per-call engine is a new path.
        pooled_connects, own_engines = [], []
        ours, original = _compat.EmbeddedEventLogStorage._connect, module.create_engine

        def counting_connect(self):
            pooled_connects.append(1)
            return ours(self)

        def counting_engine(*args, **kwargs):
            own_engines.append(traceback.extract_stack(limit=2)[0].name)
            return original(*args, **kwargs)

        monkeypatch.setattr(_compat.EmbeddedEventLogStorage, "_connect", counting_connect)
        monkeypatch.setattr(module, "create_engine", counting_engine)
        run(instance, ["a", "b", "c"])
        monkeypatch.undo()
        assert pooled_connects, moved(
            "3 (EmbeddedEventLogStorage)", "a run wrote its events without calling _connect"
        )
        assert set(own_engines) <= {"has_table"}, moved(
            "3 (EmbeddedEventLogStorage)",
            f"the parent opens engines of its own outside _connect, in {set(own_engines)}",
        )
        engine = storage.__dict__["_esper_pooled_engine"]
        with engine.connect() as conn:
            assert conn.execute(sa.text("PRAGMA synchronous")).scalar() == 1  # NORMAL
            assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
        assert stored_metadata(instance, "b")["metadata"] == {"name": "b", "size": 1}
    assert "_esper_pooled_engine" not in storage.__dict__  # disposed with the instance


def test_public_fallback_storage_runs_the_same(tmp_path: Path):
    """Dagster's default storage (no event_log_storage in dagster.yaml)."""
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert not isinstance(instance.event_log_storage, _compat.EmbeddedEventLogStorage)
        run(instance, ["a", "b"])
        assert stored_metadata(instance, "a")["metadata"] == {"name": "a", "size": 1}


# -- 5. pooled PostgreSQL connections --------------------------------------------------------
def test_the_webservers_pool_switch_has_the_shape_compat_calls():
    method = getattr(dg.DagsterInstance, "optimize_for_webserver", None)
    assert method is not None, moved(5, "DagsterInstance.optimize_for_webserver is gone")
    params = set(inspect.signature(method).parameters)
    expected = {"statement_timeout", "pool_recycle", "max_overflow"}
    assert expected <= params, moved(5, f"optimize_for_webserver takes {sorted(params)}")


def test_a_postgres_instance_keeps_one_pooled_connection(pg_server_url, tmp_path: Path):
    from esper_assets.bench.pipeline import _production_instance, throwaway_database

    with throwaway_database(pg_server_url) as url, _production_instance(url) as instance:
        # _production_instance pools as esper's processes do: the same server backend
        # answers two queries in a row (NullPool would open a new one each time).
        engine = instance.event_log_storage._engine  # noqa: SLF001
        assert not isinstance(engine.pool, sa.pool.NullPool), moved(5, "still NullPool")
        pids = set()
        for _ in range(2):
            with engine.connect() as conn:
                pids.add(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar())
        assert len(pids) == 1


def test_a_pooled_postgres_instance_asks_once_whether_a_table_exists(pg_server_url):
    from esper_assets.bench.pipeline import _production_instance, throwaway_database

    with throwaway_database(pg_server_url) as url, _production_instance(url) as instance:
        storage = instance.event_log_storage
        asked: list[int] = []  # every question to PostgreSQL checks a connection out
        sa.event.listen(storage._engine, "checkout", lambda *_: asked.append(1))  # noqa: SLF001
        for _ in range(5):
            assert storage.has_table("asset_event_tags")
        assert len(asked) == 1, moved(5, "has_table asks PostgreSQL again for a known table")
        for _ in range(3):  # a "no" is asked again: a migration may add the table
            assert not storage.has_table("no_such_table")
        assert len(asked) == 4


# -- 6. runs and ticks launched against the code location -----------------------------------
ITEM_6 = [
    "WorkspaceProcessContext", "InProcessWorkspaceLoadTarget", "InProcessCodeLocationOrigin",
    "LoadableTargetOrigin", "DefaultRunCoordinator", "SyncInMemoryRunLauncher",
    "ReconstructableJob", "_process_tick_generator", "InstigatorType", "InstigatorState",
    "InstigatorStatus", "SensorInstigatorData", "InstanceRef",
]  # fmt: skip


@dg.op
def compat_op() -> None:
    pass


@dg.job(executor_def=dg.in_process_executor)
def compat_tick_job() -> None:
    compat_op()


@dg.sensor(
    job=compat_tick_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING
)
def compat_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key="once")], cursor=(context.cursor or "") + "+"
    )


# What this module serves as a code location (daemon_in_process loads it by name): one
# Definitions at module scope, so the one above with these added.
compat_defs = dg.Definitions.merge(
    compat_defs, dg.Definitions(jobs=[compat_tick_job], sensors=[compat_sensor])
)


def test_item_6_names_are_where_compat_says():
    for name in ITEM_6:
        private(name, "6")


def test_item_6_shapes_are_what_compat_uses():
    step = private("_process_tick_generator", "6")
    params = list(inspect.signature(step).parameters)
    expected = [
        "workspace_process_context", "logger", "remote_sensor", "sensor_state",
        "sensor_debug_crash_flags", "tick_retention_settings", "submit_threadpool_executor",
    ]  # fmt: skip
    assert params == expected, moved("6", f"_process_tick_generator takes {params}")
    fields = set(private("SensorInstigatorData", "6")._fields)
    needed = {"cursor", "last_tick_timestamp", "last_tick_start_timestamp", "min_interval"}
    assert needed <= fields, moved("6", f"SensorInstigatorData has {sorted(fields)}")
    assert hasattr(private("InstigatorStatus", "6"), "DECLARED_IN_CODE"), moved(
        "6", "InstigatorStatus.DECLARED_IN_CODE is gone"
    )
    job = private("ReconstructableJob", "6")
    for cached in ("get_definition", "get_repository_definition"):
        assert hasattr(getattr(job, cached), "cache_clear"), moved(
            "6", f"ReconstructableJob.{cached} is no longer an lru_cache (drop the clearing?)"
        )
    overrides = inspect.signature(private("InstanceRef", "6").from_dir).parameters
    assert "overrides" in overrides, moved("6", "InstanceRef.from_dir takes no overrides")


def test_a_tick_through_the_daemons_step_is_the_locations_and_is_taken_when_asked(tmp_path):
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with (
        dg.DagsterInstance.from_config(str(tmp_path)) as instance,
        _compat.daemon_in_process(instance, __name__, "compat") as daemon,
    ):
        try:
            first = daemon.tick_sensor("compat_sensor", logging.getLogger(__name__))
            second = daemon.tick_sensor("compat_sensor", logging.getLogger(__name__))
        except Exception:  # the step's calling convention or state handling changed
            pytest.fail(moved("6", f"a tick through the daemon's step fails:\n"
                                   f"{traceback.format_exc()}"))  # fmt: skip
        assert first.status == "SUCCESS" and len(first.run_ids) == 1, moved("6", str(first))
        [run] = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.SUCCESS, moved("6", "the run did not execute")
        assert run.remote_job_origin.location_name == "compat"
        assert run.job_snapshot_id == daemon.job_snapshot_id("compat_tick_job")
        # At once, though the sensor's interval is 30 s; its run key is taken: no run.
        assert second.status == "SKIPPED" and second.run_ids == (), moved("6", str(second))
        assert second.cursor == "++" == daemon.sensor_cursor("compat_sensor")
        daemon.set_sensor_cursor("compat_sensor", None)
        assert daemon.sensor_cursor("compat_sensor") is None
        assert len(instance.get_runs()) == 1
