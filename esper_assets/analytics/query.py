"""``AnalyticsSession``: one in-memory DuckDB connection with the usage files, the
repository's assets and the daily rollups registered as views, asked read-only.

Read-only twice over: :meth:`AnalyticsSession.query` runs one SELECT (or EXPLAIN of
one) and refuses every other statement type before DuckDB sees it; and once the views
are registered the connection turns ``enable_external_access`` off and locks its
configuration, so DuckDB itself refuses files (``read_parquet('/etc/...')``, COPY),
ATTACH and INSTALL/LOAD, and a query cannot turn them back on.

Nothing is read through a DuckDB extension (a machine may be offline): the files come
through the ObjectStore (``analytics.dataset``) as Arrow tables.

May import: ``esper_assets.errors``, ``storage``, ``analytics``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from types import TracebackType

import duckdb
import pyarrow as pa

from esper_assets.analytics.dataset import (
    DamagedFile,
    hive_partition,
    list_parquet,
    read_parquet_object,
    read_usage,
)
from esper_assets.analytics.schema import DAILY_PREFIX
from esper_assets.errors import InvalidQuery
from esper_assets.storage.objects import ObjectStore
from esper_assets.storage.repository import AssetRepository
from esper_assets.storage.repository.query import MAX_LIMIT, AssetQuery

__all__ = [
    "ASSETS_SCHEMA",
    "CHECKPOINTS_SCHEMA",
    "KERNEL_USAGE_DAILY_PREFIX",
    "KERNEL_USAGE_DAILY_SCHEMA",
    "AnalyticsSession",
]

KERNEL_USAGE_DAILY_PREFIX = f"{DAILY_PREFIX}/kernel_usage"

ASSETS_SCHEMA = pa.schema(
    [
        ("asset_id", pa.string()),
        ("asset_type", pa.string()),
        ("name", pa.string()),
        ("version", pa.string()),
        ("state", pa.string()),
        ("size", pa.int64()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("tags", pa.list_(pa.string())),
        ("parent_id", pa.string()),
    ]
)
CHECKPOINTS_SCHEMA = ASSETS_SCHEMA.append(pa.field("run", pa.string())).append(
    pa.field("step", pa.int64())
)
# The view when no rollup has been written yet (the rollups write these columns).
KERNEL_USAGE_DAILY_SCHEMA = pa.schema(
    [
        ("day", pa.date32()),
        ("kernel_id", pa.string()),
        ("tier", pa.string()),
        ("requests", pa.int64()),
        ("hit_rate", pa.float64()),
        ("bytes", pa.int64()),
        ("p50_us", pa.float64()),
        ("p95_us", pa.float64()),
        ("p99_us", pa.float64()),
    ]
)

_VIEW_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_EXPLAIN = re.compile(r"^\s*explain(?:\s+analyze)?\s+", re.IGNORECASE)
READ_ONLY = (
    "analytics queries are read-only: run one SELECT (WITH, SHOW, DESCRIBE, EXPLAIN) "
    "over the registered views"
)


def _one_line(exc: Exception) -> str:
    """DuckDB's message without its caret drawing (``LINE 1: ...``), on one line."""
    message = str(exc).split("\nLINE ")[0]
    return " ".join(message.split())


def _parse(sql: str) -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidQuery(f"malformed query: {_one_line(exc)}") from None


def read_only_statement(sql: str) -> str:
    """``sql`` if it is one SELECT (or EXPLAIN of one), else InvalidQuery."""
    if not isinstance(sql, str):
        raise InvalidQuery(f"a query is SQL text, got {type(sql).__name__}")
    statements = _parse(sql)
    if not statements:
        raise InvalidQuery(f"the query is empty; {READ_ONLY}")
    if len(statements) != 1:
        raise InvalidQuery(f"{READ_ONLY}; got {len(statements)} statements, give one")
    statement = statements[0]
    if statement.type == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs what it explains: check that too.
        read_only_statement(_EXPLAIN.sub("", statement.query, count=1))
    elif statement.type != duckdb.StatementType.SELECT:
        kind = statement.type.name
        raise InvalidQuery(f"{READ_ONLY}; {kind} statements are refused")
    return statement.query


def _asset_row(meta) -> dict:
    return {
        "asset_id": meta.asset_id,
        "asset_type": meta.asset_type,
        "name": meta.name,
        "version": meta.version,
        "state": meta.state,
        "size": meta.size_bytes,
        "created_at": meta.created_at,
        "tags": sorted(meta.tags),
        "parent_id": meta.parent_id,
    }


def _checkpoint_row(meta) -> dict:
    step = meta.properties.get("step")
    return {
        **_asset_row(meta),
        "run": meta.properties.get("run"),
        "step": step if isinstance(step, int) else None,
    }


def all_assets(repo: AssetRepository) -> list:
    """Every asset's metadata (expired ones too), through the public search, by page."""
    found: list = []
    while True:
        query = AssetQuery().include_expired().limit(MAX_LIMIT).offset(len(found))
        page = repo.search_assets(query)
        found.extend(page)
        if len(page) < MAX_LIMIT:
            return found


class AnalyticsSession:
    """DuckDB over the usage files, assets, checkpoints and daily rollups; read only.

    Use as a context manager (or call :meth:`close`). ``skipped`` lists the (key,
    reason) of the damaged files met while registering ``events`` and
    ``kernel_usage_daily``: the views hold the rest.
    """

    def __init__(
        self, store: ObjectStore, repo: AssetRepository | None = None, standard_views: bool = True
    ) -> None:
        """``standard_views=False``: none of the views above, only what the caller
        registers (the rollups read one day; loading every day's files first cost them
        most of their time). The standard views are loaded when a query first names
        one: counting assets reads no usage file."""
        self.store = store
        self.skipped: list[tuple[str, str]] = []
        self._repo = repo
        self._metas: list | None = None
        self._unloaded: dict[str, Callable[[], pa.Table]] = {}
        if standard_views:
            self._unloaded = {
                "events": self._events,
                "assets": self._assets,
                "checkpoints": self._checkpoints,
                "kernel_usage_daily": self._kernel_usage_daily,
            }
        self._conn = duckdb.connect(":memory:")
        try:
            # From here on DuckDB itself refuses files, ATTACH and INSTALL/LOAD, and no
            # query can SET them back: registering Arrow tables still works.
            self._conn.execute("SET enable_external_access = false")
            self._conn.execute("SET lock_configuration = true")
        except BaseException:
            self._conn.close()
            raise

    # -- the standard views, each read when first named --------------------------------
    def _load_views_named_in(self, statement: str) -> None:
        if not self._unloaded:
            return
        try:
            named = {name.lower() for name in self._conn.get_table_names(statement)}
        except duckdb.Error:  # cannot bind it yet: load them all, DuckDB then says why
            named = set(self._unloaded)
        for name in sorted(named & self._unloaded.keys()):
            self.register(name, self._unloaded.pop(name)())

    def _events(self) -> pa.Table:
        events = read_usage(self.store)
        self.skipped.extend(events.skipped)
        return events.table

    def _all_metas(self) -> list:
        if self._metas is None:
            self._metas = all_assets(self._repo) if self._repo is not None else []
        return self._metas

    def _assets(self) -> pa.Table:
        rows = [_asset_row(m) for m in self._all_metas()]
        return pa.Table.from_pylist(rows, schema=ASSETS_SCHEMA)

    def _checkpoints(self) -> pa.Table:
        rows = [_checkpoint_row(m) for m in self._all_metas() if m.asset_type == "checkpoint"]
        return pa.Table.from_pylist(rows, schema=CHECKPOINTS_SCHEMA)

    def _kernel_usage_daily(self) -> pa.Table:
        tables = []
        for key, _ in list_parquet(self.store, KERNEL_USAGE_DAILY_PREFIX):
            try:
                tables.append(_with_day(read_parquet_object(self.store, key), key))
            except DamagedFile as exc:
                self.skipped.append((key, str(exc)))
        if not tables:
            return KERNEL_USAGE_DAILY_SCHEMA.empty_table()
        return pa.concat_tables(tables, promote_options="permissive")

    def register(self, name: str, table: pa.Table) -> None:
        """Make ``table`` queryable as ``name`` (replacing a view of that name)."""
        if not isinstance(name, str) or not _VIEW_NAME.fullmatch(name):
            raise InvalidQuery(
                f"view name {name!r:.70} is not an identifier: use letters, digits and _"
            )
        if not isinstance(table, pa.Table):
            raise InvalidQuery(f"view {name!r} needs a pyarrow.Table, got {type(table).__name__}")
        self._conn.register(name, table)

    def query(self, sql: str) -> pa.Table:
        """The result of one read-only statement; InvalidQuery with DuckDB's message
        when it is malformed or refers to what is not there, or when it is refused."""
        statement = read_only_statement(sql)
        self._load_views_named_in(statement)
        try:
            return self._conn.sql(statement).to_arrow_table()
        except duckdb.PermissionException as exc:
            raise InvalidQuery(f"{READ_ONLY}; DuckDB refused: {_one_line(exc)}") from None
        except duckdb.Error as exc:
            raise InvalidQuery(f"query failed: {_one_line(exc)}") from None

    def views(self) -> list[str]:
        """The names a query can read, sorted (loaded or not yet)."""
        loaded = self.query("SHOW TABLES").column("name").to_pylist()
        return sorted({*loaded, *self._unloaded})

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AnalyticsSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _with_day(table: pa.Table, key: str) -> pa.Table:
    """A rollup file with its ``day`` column (from the path when the file has none)."""
    if "day" in table.column_names:
        return table
    day, _ = hive_partition(key)
    column = pa.array([day] * table.num_rows, pa.string()).cast(pa.date32())
    return table.add_column(0, "day", column)
