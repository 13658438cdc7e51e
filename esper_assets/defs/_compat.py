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
   (a public name, but undocumented: the webserver's own switch) for esper's processes.

Every private name is reached through :func:`dagster_private` and listed, with the
module it lives in, in ``PRIVATE_NAMES``: the one place ``dagster._`` is spelled.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from sqlalchemy import create_engine
from sqlalchemy import event as sa_event

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

    ``statement_timeout=0`` keeps PostgreSQL's default (no timeout). Not covered:
    runs a daemon launches in their own process (``dagster api execute_run``).
    Public fallback: none needed; without this the storages work as before, slower.
    """
    storage_module = type(instance.event_log_storage).__module__
    if storage_module.startswith("dagster_postgres"):
        instance.optimize_for_webserver(
            statement_timeout=0, pool_recycle=POOL_RECYCLE_S, max_overflow=POOL_OVERFLOW
        )
    return instance
