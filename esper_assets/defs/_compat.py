"""Every place esper_assets depends on Dagster beyond its public API (Dagster 1.13).

The rest of esper_assets uses public Dagster only and imports these from here.
``esper_assets_tests/defs/test_dagster_compat.py`` fails, naming the item and what to
do, when a Dagster upgrade moves or reshapes any of them. Each item says what it
buys and what the public fallback is. Measured with Dagster 1.13.27 on the
project's 2-core machine while other jobs ran (load average 2.3-4.6, so absolute
times are inflated and vary ~30% between runs; the ratios are the point): single-
run backfills of ``esper bench pipeline``'s small blueprints through
``driver.backfill``, each in a fresh ESPER_HOME, timing the backfill alone.

1. Run tag names (``RUN_KEY_TAG`` ...): strings, not a private import.
2. :func:`data_version_tags`: the tags Dagster's staleness reads from a
   materialization (data version, code version, input data versions and event
   pointers), written on the per-partition materializations esper reports itself.
3. :class:`EmbeddedEventLogStorage`: a subclass of Dagster's consolidated SQLite
   event log (documented "for test cases only"), overriding its ``_connect``.
4. Tests only: ``InstanceRef`` (how a ``dagster.yaml`` resolves, without opening the
   instance) and ``get_stale_status_resolver`` (Dagster's own staleness, as the UI
   computes it, for a few assets on an instance).
5. :func:`pool_postgres_connections`: ``DagsterInstance.optimize_for_webserver``
   (a public name, but undocumented: the webserver's own switch) and the event log's
   ``has_table`` answered from memory, in esper's own processes.
6. :func:`daemon_in_process`: the sensor daemon's per-sensor step
   (``_process_tick_generator``) run in this process on the code location
   ``esper_assets`` loaded in process (``WorkspaceProcessContext`` over an
   ``InProcessCodeLocationOrigin``), on an instance object over the same storage
   (``InstanceRef`` of item 4) whose runs are submitted by ``DefaultRunCoordinator``
   and executed by ``SyncInMemoryRunLauncher``: ``esper ingest`` and ``make demo``
   tick a sensor when asked and its runs execute before the tick returns, each with
   the job's own executor. What it buys: the ticks are in the sensor's history and
   the runs carry the location's origin and snapshot, so the UI shows them as the
   location's (sensor runs, the timeline, re-execute), exactly as the daemon's;
   and no wait for ``minimum_interval_seconds`` (the stored last-tick stamps are
   moved back so the tick is due). ``ReconstructableJob``'s one-entry caches are
   cleared on entry and exit: a launched run loads the job again from the module,
   and in one process (the tests) the cache would serve the definitions of an
   earlier environment. Measured (the 12 examples, ``run_ingest`` on a fresh embedded
   instance, 5 ticks, 12 runs): 4.6-5.6 s. Public fallback: ``dagster-daemon run``
   (the sensor is RUNNING by default; else ``dagster sensor start``) as a
   subprocess until the runs are done, then stopped: 104.9 s for the same 12 runs,
   as the daemon ticks every 30 s and a child waits a tick for its parent (4
   ticks here), and each run is a process of its own.

Every private name is reached through :func:`dagster_private` and listed, with the
module it lives in, in ``PRIVATE_NAMES``: the one place ``dagster._`` is spelled.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster_postgres import PostgresEventLogStorage as DagsterPostgresEventLogStorage
from sqlalchemy import create_engine
from sqlalchemy import event as sa_event

from esper_assets.errors import EsperError

# -- 0. where Dagster keeps each private name ---------------------------------------------
PRIVATE_NAMES: dict[str, str] = {
    # 1. run tags (compared, not imported: see below)
    "SENSOR_NAME_TAG": "dagster._core.storage.tags",
    "RUN_KEY_TAG": "dagster._core.storage.tags",
    "ASSET_PARTITION_RANGE_START_TAG": "dagster._core.storage.tags",
    "ASSET_PARTITION_RANGE_END_TAG": "dagster._core.storage.tags",
    "DATA_VERSION_TAG": "dagster._core.definitions.data_version",
    "PARTITION_NAME_TAG": "dagster._core.storage.tags",
    # 2. data-version tags
    "CODE_VERSION_TAG": "dagster._core.definitions.data_version",
    "DATA_VERSION_IS_USER_PROVIDED_TAG": "dagster._core.definitions.data_version",
    "INPUT_DATA_VERSION_TAG_PREFIX": "dagster._core.definitions.data_version",
    "INPUT_EVENT_POINTER_TAG_PREFIX": "dagster._core.definitions.data_version",
    # 3. the embedded event log's parent and busy timeout
    "ConsolidatedSqliteEventLogStorage": (
        "dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log"
    ),
    "SQLITE_BUSY_TIMEOUT_SECONDS": "dagster._core.storage.sqlite",
    # 4. tests only
    "InstanceRef": "dagster._core.instance.ref",
    "get_stale_status_resolver": "dagster._utils.test.data_versions",
    # 6. runs and ticks launched against the code location (also ``InstanceRef``, item 4)
    "WorkspaceProcessContext": "dagster._core.workspace.context",
    "InProcessWorkspaceLoadTarget": "dagster._core.workspace.load_target",
    "InProcessCodeLocationOrigin": "dagster._core.remote_origin",
    "LoadableTargetOrigin": "dagster._core.types.loadable_target_origin",
    "DefaultRunCoordinator": "dagster._core.run_coordinator",
    "SyncInMemoryRunLauncher": "dagster._core.launcher.sync_in_memory_run_launcher",
    "ReconstructableJob": "dagster._core.definitions.reconstruct",
    "_process_tick_generator": "dagster._daemon.sensor",
    "InstigatorType": "dagster._core.definitions.run_request",
    "InstigatorState": "dagster._core.scheduler.instigation",
    "InstigatorStatus": "dagster._core.scheduler.instigation",
    "SensorInstigatorData": "dagster._core.scheduler.instigation",
}


def dagster_private(name: str) -> Any:
    """Dagster's private ``name``, from the module ``PRIVATE_NAMES`` says holds it
    (ImportError or AttributeError when Dagster moved it)."""
    return getattr(importlib.import_module(PRIVATE_NAMES[name]), name)


def private_module(name: str) -> Any:
    """The Dagster module that holds the private ``name`` (tests patch what it imports)."""
    return importlib.import_module(PRIVATE_NAMES[name])


ConsolidatedSqliteEventLogStorage = dagster_private("ConsolidatedSqliteEventLogStorage")
SQLITE_BUSY_TIMEOUT_SECONDS = dagster_private("SQLITE_BUSY_TIMEOUT_SECONDS")

# -- 1. run tags -------------------------------------------------------------------------
# Dagster has no public name for these (only ``MAX_RUNTIME_SECONDS_TAG`` is exported);
# its own constants live in ``dagster._core.storage.tags`` and
# ``dagster._core.definitions.data_version``. The values are what every run and event
# already stored in an instance carries, and what the daemon and the UI read:
#
# - a single-run backfill: ``execute_in_process`` takes one ``partition_key``; a run
#   over a range of partitions is asked for with the two range tags (as Dagster's
#   own backfill daemon and ``dagster asset materialize --partition-range`` do).
#   Public fallback: one run per partition. Measured: 100 blueprints as one run
#   4.6 s, as 100 runs (``execute_in_process(partition_key=...)`` each) 76.2 s.
#   The tags are strings either way: this item is about the names, not an import.
# - sensor name + run key on the driver's runs, so a daemon started later skips the
#   file contents the driver already ran. Public fallback: none (without them the
#   daemon runs every landed file again).
# - the data-version tag on a materialization, read back for lineage.
# - the partition tag on a ``verify_checkpoints`` run: a job of asset checks alone
#   has no partitions definition in Dagster 1.13 (it is inferred from selected
#   assets), so ``RunRequest(partition_key=...)`` is refused; the tag is how the
#   run still evaluates ``checkpoint_restorable`` on one partition. Public
#   fallback: an unpartitioned check (one outcome for all runs).
#
# Importing Dagster's constants instead would buy nothing: same strings, one more
# private import. The test compares these with Dagster's constants and checks that
# Dagster honours them.
SENSOR_NAME_TAG = "dagster/sensor_name"
RUN_KEY_TAG = "dagster/run_key"
ASSET_PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
ASSET_PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"
DATA_VERSION_TAG = "dagster/data_version"
PARTITION_NAME_TAG = "dagster/partition"


# -- 2. data-version tags on reported materializations -------------------------------------
CODE_VERSION_TAG = "dagster/code_version"
DATA_VERSION_IS_USER_PROVIDED_TAG = "dagster/data_version_is_user_provided"
INPUT_DATA_VERSION_TAG_PREFIX = "dagster/input_data_version"
INPUT_EVENT_POINTER_TAG_PREFIX = "dagster/input_event_pointer"


def data_version_tags(
    data_version: str, code_version: str, inputs: dict[dg.AssetKey, tuple[str, int]] | None = None
) -> dict[str, str]:
    """The tags Dagster writes on a materialization for its data version, and reads back
    to say whether the asset is stale, for a materialization we report ourselves.

    Dagster writes one data version per asset per step, on every partition the step
    materializes (dagster-io/dagster#18649); a step over many partitions reports each
    partition's ``dg.AssetMaterialization`` itself instead, with these tags.
    ``inputs``: per upstream asset, the data version of the partition this one was made
    from and the storage id of that partition's materialization (Dagster's staleness
    asks whether that partition was materialized again, with another data version,
    after that event). ``dg.AssetMaterialization`` accepts these as system tags.

    Public fallback: one partition per run (``BackfillPolicy.multi_run(1)``) and
    ``MaterializeResult(data_version=...)``: measured 0.36 s per partition in process,
    against a few ms here.
    """
    tags = {
        DATA_VERSION_TAG: data_version,
        CODE_VERSION_TAG: code_version,
        DATA_VERSION_IS_USER_PROVIDED_TAG: "true",
    }
    for key, (version, storage_id) in (inputs or {}).items():
        tags[f"{INPUT_DATA_VERSION_TAG_PREFIX}/{key.to_user_string()}"] = version
        tags[f"{INPUT_EVENT_POINTER_TAG_PREFIX}/{key.to_user_string()}"] = str(storage_id)
    return tags


# -- 3. the embedded event log ------------------------------------------------------------
class EmbeddedEventLogStorage(ConsolidatedSqliteEventLogStorage):
    """Dagster's single-file SQLite event log, kept open and without an fsync per commit.

    Dagster's default SQLite event log writes each asset event to two files (the
    run's shard and the index) through a new engine and connection every time;
    closing the last connection to a WAL database checkpoints it, which costs two
    fsyncs. Its consolidated variant (one file; documented "for test cases only")
    still opens an engine per call. This one overrides the parent's private
    ``_connect`` (and reads its ``_conn_string``) to keep one pooled engine on one
    file, under WAL with ``synchronous=NORMAL``: a commit survives a crash of any
    process, a power cut may lose the last few.

    Measured (300 blueprints, accumulator metadata): 8.3-12.1 s (three runs)
    against 57.7 s on Dagster's default SQLite storage and 43.8 s on the
    consolidated variant unchanged: 28-40 ms per blueprint against 192 ms.
    Not covered: the parent's ``has_table`` (called per asset event and per
    dynamic-partitions query) still opens an engine per call, ~0.7 ms each.

    Public fallback: Dagster's default storage, a ``dagster.yaml`` with no
    ``event_log_storage`` (or ``storage: sqlite``); production uses PostgreSQL.
    """

    @contextmanager
    def _connect(self) -> Iterator:
        with self._esper_engine().connect() as conn, conn.begin():
            yield conn

    def _esper_engine(self):
        engine = self.__dict__.get("_esper_pooled_engine")
        if engine is None:
            engine = create_engine(
                self._conn_string, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS}
            )
            sa_event.listen(engine, "connect", _relax_durability)
            self.__dict__["_esper_pooled_engine"] = engine
        return engine

    def dispose(self) -> None:
        engine = self.__dict__.pop("_esper_pooled_engine", None)
        if engine is not None:
            engine.dispose()
        super().dispose()


def _relax_durability(dbapi_connection, _record) -> None:
    dbapi_connection.execute("PRAGMA synchronous=NORMAL")


# -- 5. pooled PostgreSQL connections in esper's own processes ------------------------------
POOL_RECYCLE_S = 3600  # a pooled connection is replaced after an hour
POOL_OVERFLOW = 4  # connections beyond the one kept open, for concurrent calls


def pool_postgres_connections(instance: dg.DagsterInstance) -> dg.DagsterInstance:
    """``instance``, its PostgreSQL storages (if it has them) switched to a pooled engine.

    dagster-postgres builds its engines with ``NullPool``: every query opens, and
    closes, a new PostgreSQL connection (its comment: so that instances do not
    accumulate connections). A run writes hundreds of events with several queries
    each: a 100-blueprint backfill opened 2,242 connections, 7.5 s of its 17 s.
    ``dagster-webserver`` switches the storages to a pool of one kept connection with
    ``optimize_for_webserver``; esper does the same for the runs it executes in its
    own processes (``esper ingest``, ``make demo``, the benches), which close the
    instance when done. Measured, 100 blueprints on deploy/dagster.yaml, same
    machine and run: 14.0-17.3 s without, 7.2 s with.

    The pool keeps one connection, and dagster-postgres asks the catalog whether a
    table exists (``has_table``) for every materialization that carries a data
    version and every check evaluation, from inside the transaction that holds that
    connection: each question opened and closed a connection of its own (201 of the
    203 connections of a 100-blueprint backfill). Tables are only ever added (by
    ``dagster instance migrate``), so a yes is remembered for the instance's life; a
    no is asked again. Measured, 1,000 blueprints (``esper bench pipeline``): see
    the README's benchmark section.

    ``statement_timeout=0`` keeps PostgreSQL's default (no timeout). Not covered:
    runs a daemon launches in their own process (``dagster api execute_run``).
    Public fallback: none needed; without this the storages work as before, slower.
    """
    storage = instance.event_log_storage
    if isinstance(storage, DagsterPostgresEventLogStorage):
        instance.optimize_for_webserver(
            statement_timeout=0, pool_recycle=POOL_RECYCLE_S, max_overflow=POOL_OVERFLOW
        )
        storage.has_table = _remembering_yes(storage.has_table)
    return instance


def _remembering_yes(has_table: Callable[[str], bool]) -> Callable[[str], bool]:
    """``has_table``, asking again only for tables it has not yet seen exist."""
    known: set[str] = set()

    def remembered(table_name: str) -> bool:
        if table_name not in known and has_table(table_name):
            known.add(table_name)
        return table_name in known

    return remembered


# -- 6. runs and ticks launched against the code location ----------------------------------
@dataclass(frozen=True)
class SensorTick:
    """What one tick recorded in its sensor's tick history."""

    status: str  # SUCCESS | SKIPPED | FAILURE
    run_ids: tuple[str, ...]  # the runs it launched (a run key already used launches none)
    cursor: str | None
    error: Any = None  # FAILURE: why (Dagster's SerializableErrorInfo: message, cause)


class LocationDaemon:
    """A code location loaded in this process and the sensor daemon's step for one of its
    sensors; ``instance`` (the daemon's view of the caller's storage) executes each run
    the tick submits before the tick returns."""

    def __init__(self, context: Any) -> None:
        self._context = context

    @property
    def instance(self) -> dg.DagsterInstance:
        return self._context.instance

    def job_snapshot_id(self, job_name: str) -> str:
        """The snapshot id of the location's ``job_name`` (what its runs record)."""
        return self._repository().get_full_job(job_name).identifying_job_snapshot_id

    def sensor_cursor(self, name: str) -> str | None:
        state = self._stored_state(self._repository().get_sensor(name))
        return state.instigator_data.cursor if state and state.instigator_data else None

    def set_sensor_cursor(self, name: str, cursor: str | None) -> None:
        """Store ``cursor`` as the sensor's (what ``dagster sensor cursor --set`` does)."""
        state = self._running_state(self._repository().get_sensor(name))
        self.instance.update_instigator_state(
            state.with_data(state.instigator_data._replace(cursor=cursor))
        )

    def tick_sensor(self, name: str, logger: logging.Logger) -> SensorTick:
        """One tick of the sensor ``name`` now, as the daemon takes it: evaluated with its
        stored cursor; partitions, asset events and runs (skipping run keys already used)
        recorded; the runs executed; the tick and the new cursor stored."""
        instance = self.instance
        sensor = self._repository().get_sensor(name)
        state = self._running_state(sensor)
        data = state.instigator_data
        interval = sensor.min_interval_seconds or 0
        if interval and (data.last_tick_timestamp or data.last_tick_start_timestamp):
            # The daemon waits minimum_interval_seconds between ticks; a command ticks when
            # asked. The stamps are moved back so the tick is due (the tick sets them anew).
            due = time.time() - interval
            state = instance.update_instigator_state(
                state.with_data(
                    data._replace(
                        last_tick_timestamp=data.last_tick_timestamp
                        and min(data.last_tick_timestamp, due),
                        last_tick_start_timestamp=data.last_tick_start_timestamp
                        and min(data.last_tick_start_timestamp, due),
                    )
                )
            )
        ids = (sensor.get_remote_origin_id(), sensor.selector_id)
        before = instance.get_ticks(*ids, limit=1)
        step = dagster_private("_process_tick_generator")
        retention = instance.get_tick_retention_settings(dagster_private("InstigatorType").SENSOR)
        # (context, logger, sensor, state, debug crash flags, retention, submit threadpool)
        errors = [e for e in step(self._context, logger, sensor, state, None, retention, None) if e]
        after = instance.get_ticks(*ids, limit=1)
        if not after or (before and after[0].tick_id == before[0].tick_id):
            why = "; ".join(e.to_string() for e in errors) or "the sensor was not due"
            raise EsperError(f"sensor {name}: no tick was taken: {why}")
        tick = after[0]
        error = tick.error or (errors[0] if errors else None)
        return SensorTick(tick.status.value, tuple(tick.run_ids), tick.cursor, error)

    def _repository(self) -> Any:
        request = self._context.create_request_context()
        for entry in request.get_code_location_entries().values():
            if entry.load_error is not None:
                raise EsperError(f"code location {entry.origin.location_name} did not load: "
                                   f"{entry.load_error.to_string()}")  # fmt: skip
            return next(iter(entry.code_location.get_repositories().values()))
        raise EsperError("no code location was loaded")

    def _stored_state(self, sensor: Any) -> Any:
        return self.instance.get_instigator_state(sensor.get_remote_origin_id(), sensor.selector_id)

    def _running_state(self, sensor: Any) -> Any:
        """The sensor's stored state; a sensor RUNNING by default that never ticked gets
        the state the daemon gives it on its first tick. A stopped sensor is refused."""
        state = self._stored_state(sensor)
        if state is None and sensor.default_status == dg.DefaultSensorStatus.RUNNING:
            data = dagster_private("SensorInstigatorData")
            state = self.instance.add_instigator_state(
                dagster_private("InstigatorState")(
                    sensor.get_remote_origin(),
                    dagster_private("InstigatorType").SENSOR,
                    dagster_private("InstigatorStatus").DECLARED_IN_CODE,
                    data(
                        min_interval=sensor.min_interval_seconds,
                        last_sensor_start_timestamp=time.time(),
                        sensor_type=sensor.sensor_type,
                    ),
                )
            )
        if state is None or not sensor.get_current_instigator_state(state).is_running:
            raise EsperError(
                f"sensor {sensor.name} is stopped in the Dagster instance at "
                f"{self.instance.root_directory}: start it in the UI (make dev) first"
            )
        return state


def _launch_here() -> dict[str, dict[str, str]]:
    """Instance overrides: runs are submitted without a queue and executed in this
    process, synchronously, each with its job's own executor."""
    return {
        role: {"module": PRIVATE_NAMES[name], "class": name}
        for role, name in (
            ("run_coordinator", "DefaultRunCoordinator"),
            ("run_launcher", "SyncInMemoryRunLauncher"),
        )
    }


def _forget_loaded_jobs() -> None:
    job = dagster_private("ReconstructableJob")
    job.get_definition.cache_clear()
    job.get_repository_definition.cache_clear()


@contextmanager
def daemon_in_process(
    instance: dg.DagsterInstance, module_name: str, location_name: str
) -> Iterator[LocationDaemon]:
    """The code location ``location_name`` (module ``module_name``, as workspace.yaml
    names it), loaded in this process as Dagster loads it, over ``instance``'s storage
    (its ``dagster.yaml``, with runs launched here: ``_launch_here``)."""
    ref = dagster_private("InstanceRef").from_dir(instance.root_directory, overrides=_launch_here())
    origin = dagster_private("InProcessCodeLocationOrigin")(
        dagster_private("LoadableTargetOrigin")(
            executable_path=sys.executable, module_name=module_name
        ),
        location_name=location_name,
    )
    target = dagster_private("InProcessWorkspaceLoadTarget")(origin)
    _forget_loaded_jobs()
    try:
        with (
            dg.DagsterInstance.from_ref(ref) as own,
            dagster_private("WorkspaceProcessContext")(
                pool_postgres_connections(own), target
            ) as context,
        ):
            yield LocationDaemon(context)
    finally:
        _forget_loaded_jobs()
