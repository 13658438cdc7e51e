"""Numbered SQL migrations (esper_assets.storage.db.migrations) on SQLite and PostgreSQL.

Every behaviour runs on both dialects (a tmp SQLite file; a fresh PostgreSQL
schema from the ``pg_url`` fixture): migrations apply once and are recorded in
esper_migrations; applying again is a no-op; a new numbered file applies on
its own; a failing migration leaves nothing behind; an edited applied migration
is refused; the tables and indexes that 001_kernel_cache.sql creates exist;
several processes (spawn) migrating the same database at the same moment (fresh,
with one new migration pending, and through the tiers' constructors) all
succeed with exactly one of them applying. File checks: gaps in numbering,
badly named files, a missing folder.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

from esper_assets.errors import MigrationError
from esper_assets.storage.db.migrations import (
    load_migrations,
    migrate_postgres,
    migrate_sqlite,
    sql_root,
)

DIALECTS = ["sqlite", "postgres"]
PROCESSES = 4


class Database:
    """One migration target: a SQLite file or a PostgreSQL schema."""

    def __init__(self, dialect: str, target: str) -> None:
        self.dialect = dialect
        self.target = target
        self.conn = connect(dialect, target)

    def migrate(self, root: Path | None = None) -> list[int]:
        migrations = load_migrations(self.dialect, root=root)
        migrate = migrate_sqlite if self.dialect == "sqlite" else migrate_postgres
        return migrate(self.conn, migrations)

    def rows(self, sql: str) -> list[tuple]:
        return [tuple(r) for r in self.conn.execute(sql).fetchall()]

    def recorded(self) -> list[tuple]:
        return self.rows("SELECT version, name, checksum FROM esper_migrations ORDER BY version")

    def tables(self) -> set[str]:
        if self.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'table'"
        else:
            sql = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        return {r[0] for r in self.rows(sql)}

    def indexes(self) -> set[str]:
        if self.dialect == "sqlite":
            sql = "SELECT name FROM sqlite_master WHERE type = 'index'"
        else:
            sql = "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
        return {r[0] for r in self.rows(sql)}


def connect(dialect: str, target: str):
    if dialect == "sqlite":
        return sqlite3.connect(target, isolation_level=None, timeout=30)
    import psycopg

    return psycopg.connect(target, autocommit=True)


@pytest.fixture(params=DIALECTS)
def db(request, tmp_path):
    if request.param == "sqlite":
        target = str(tmp_path / "esper.sqlite3")
    else:
        target = request.getfixturevalue("pg_url")
    database = Database(request.param, target)
    yield database
    database.conn.close()


@pytest.fixture
def sql_copy(tmp_path) -> Path:
    """A private sql/ folder holding only the real 001 migration, for a test to extend."""
    root = tmp_path / "sql"
    for dialect in DIALECTS:
        (root / dialect).mkdir(parents=True)
        shutil.copy(sql_root() / dialect / "001_kernel_cache.sql", root / dialect)
    return root


def all_versions(dialect: str) -> list[int]:
    """The numbers of the repository's real migrations: 1..N."""
    return [m.version for m in load_migrations(dialect)]


def created_names(dialect: str, kind: str) -> set[str]:
    """Names of the TABLEs or INDEXes that 001_kernel_cache.sql creates."""
    sql = (sql_root() / dialect / "001_kernel_cache.sql").read_text()
    pattern = rf"CREATE {kind} IF NOT EXISTS (\w+)"
    return set(re.findall(pattern, sql, flags=re.IGNORECASE))


# -- applying ---------------------------------------------------------------------------------
def test_migrations_apply_once_and_are_recorded(db):
    expected = load_migrations(db.dialect)
    assert db.migrate() == [m.version for m in expected]
    assert db.recorded() == [(m.version, m.name, m.checksum) for m in expected]


def test_applying_again_is_a_no_op(db):
    db.migrate()
    recorded = db.recorded()
    assert db.migrate() == []
    assert db.migrate() == []
    assert db.recorded() == recorded


def test_kernel_cache_tables_and_indexes_exist(db):
    db.migrate()
    tables = created_names(db.dialect, "TABLE")
    indexes = created_names(db.dialect, "INDEX")
    assert "kernel_cache" in tables
    assert len(indexes) >= 3
    assert tables | {"esper_migrations"} <= db.tables()
    assert indexes <= db.indexes()


def test_kernel_cache_accepts_a_row_after_migrating(db):
    db.migrate()
    mark = "?" if db.dialect == "sqlite" else "%s"
    db.conn.execute(
        f"INSERT INTO kernel_cache (id, data, size_bytes, stored_bytes) VALUES ({mark}, {mark}, 3, 27)",
        ("k", b"abc"),
    )
    assert db.rows("SELECT id, access_count FROM kernel_cache") == [("k", 0)]


def test_kernel_cache_refuses_row_with_both_data_and_object_key(db):
    db.migrate()
    with pytest.raises(Exception, match="(?i)check"):
        db.conn.execute(
            "INSERT INTO kernel_cache (id, data, object_key, size_bytes, stored_bytes)"
            " VALUES ('k', 'abc', 'objects/k', 3, 27)"
        )


def test_postgres_data_column_is_not_recompressed(pg_url):
    database = Database("postgres", pg_url)
    database.migrate()
    storage = database.rows(
        "SELECT a.attstorage FROM pg_attribute a"
        " WHERE a.attrelid = 'kernel_cache'::regclass AND a.attname = 'data'"
    )
    database.conn.close()
    assert storage == [("e",)]  # EXTERNAL: out of line, uncompressed


def test_new_numbered_migration_applies_alone(db, sql_copy):
    assert db.migrate(sql_copy) == [1]
    (sql_copy / db.dialect / "002_add_notes.sql").write_text(
        "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT);\n"
    )
    assert db.migrate(sql_copy) == [2]
    assert [r[:2] for r in db.recorded()] == [(1, "kernel_cache"), (2, "add_notes")]
    assert "notes" in db.tables()


def test_failing_migration_leaves_nothing_behind(db, sql_copy):
    db.migrate(sql_copy)
    (sql_copy / db.dialect / "002_broken.sql").write_text(
        "CREATE TABLE half_done (id INTEGER);\nINSERT INTO no_such_table VALUES (1);\n"
    )
    with pytest.raises(Exception, match="no_such_table"):
        db.migrate(sql_copy)
    assert [r[0] for r in db.recorded()] == [1]
    assert "half_done" not in db.tables()


def test_edited_applied_migration_is_refused(db, sql_copy):
    db.migrate(sql_copy)
    first = sql_copy / db.dialect / "001_kernel_cache.sql"
    first.write_text(first.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match="001_kernel_cache changed after it was applied"):
        db.migrate(sql_copy)


def test_edited_migration_blocks_later_ones(db, sql_copy):
    db.migrate(sql_copy)
    first = sql_copy / db.dialect / "001_kernel_cache.sql"
    first.write_text(first.read_text().replace("kernel_cache_accessed_at_idx", "renamed_idx"))
    (sql_copy / db.dialect / "002_later.sql").write_text("CREATE TABLE later (id INTEGER);\n")
    with pytest.raises(MigrationError):
        db.migrate(sql_copy)
    assert "later" not in db.tables()
    assert [r[0] for r in db.recorded()] == [1]


# -- migration files ----------------------------------------------------------------------------
def write_migrations(root: Path, dialect: str, *names: str) -> None:
    folder = root / dialect
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("SELECT 1;\n")


@pytest.mark.parametrize("dialect", DIALECTS)
def test_repository_migrations_load_in_order(dialect):
    migrations = load_migrations(dialect)
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].name == "kernel_cache"


@pytest.mark.parametrize(
    "names",
    [
        ("001_a.sql", "003_c.sql"),
        ("002_b.sql",),
        ("001_a.sql", "002_b.sql", "004_d.sql"),
    ],
)
def test_gap_in_numbering_raises(tmp_path, names):
    write_migrations(tmp_path, "sqlite", *names)
    with pytest.raises(MigrationError, match="without gaps"):
        load_migrations("sqlite", root=tmp_path)


def test_duplicate_number_raises(tmp_path):
    write_migrations(tmp_path, "sqlite", "001_a.sql", "001_b.sql")
    with pytest.raises(MigrationError):
        load_migrations("sqlite", root=tmp_path)


@pytest.mark.parametrize(
    "bad_name",
    ["1_init.sql", "0001_init.sql", "001-init.sql", "001_Init.sql", "init.sql", "001_.sql"],
)
def test_badly_named_file_raises(tmp_path, bad_name):
    write_migrations(tmp_path, "postgres", "001_init.sql", bad_name)
    with pytest.raises(MigrationError, match="NNN_lower_snake"):
        load_migrations("postgres", root=tmp_path)


def test_missing_folder_raises(tmp_path):
    with pytest.raises(MigrationError, match="no migrations folder"):
        load_migrations("postgres", root=tmp_path)


# -- several processes at once ------------------------------------------------------------------
def _migrate_in_child(dialect, target, root, via_tier, barrier, results) -> None:
    """Runs in a spawned process: wait for the others, then migrate."""
    try:
        if via_tier:  # the real start-up path: the tier's constructor migrates
            from esper_assets.storage.cache.tiers.sql import PostgresTier, SqliteTier

            barrier.wait(timeout=60)
            tier = SqliteTier(target) if dialect == "sqlite" else PostgresTier(target)
            tier.close()
            results.put(("ok", None))
            return
        conn = connect(dialect, target)
        try:
            migrations = load_migrations(dialect, root=root)
            migrate = migrate_sqlite if dialect == "sqlite" else migrate_postgres
            barrier.wait(timeout=60)
            results.put(("ok", migrate(conn, migrations)))
        finally:
            conn.close()
    except BaseException as exc:  # reported to the parent
        results.put(("error", repr(exc)))


def run_concurrently(dialect: str, target: str, root: Path | None = None, via_tier=False):
    """Start PROCESSES spawned processes that migrate at the same moment; their outcomes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    results = ctx.Queue()
    args = (dialect, target, root, via_tier, barrier, results)
    procs = [ctx.Process(target=_migrate_in_child, args=args) for _ in range(PROCESSES)]
    try:
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():  # only if something hung: don't leave it behind
                p.kill()
                p.join()
    assert [p.exitcode for p in procs] == [0] * PROCESSES
    assert all(status == "ok" for status, _ in outcomes), outcomes
    return [versions for _, versions in outcomes]


@pytest.fixture(params=DIALECTS)
def shared_target(request, tmp_path) -> tuple[str, str]:
    """(dialect, target) for a database that several processes open."""
    if request.param == "sqlite":
        return "sqlite", str(tmp_path / "shared.sqlite3")
    return "postgres", request.getfixturevalue("pg_url")


def assert_recorded_once(dialect: str, target: str, versions: list[int]) -> None:
    database = Database(dialect, target)
    try:
        assert [r[0] for r in database.recorded()] == versions
        assert "kernel_cache" in database.tables()
    finally:
        database.conn.close()


# Slow enough (~0.1 s) that the processes really overlap while it runs.
SLOW_MIGRATION = """CREATE TABLE notes (id INTEGER);
INSERT INTO notes WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 200000)
SELECT x FROM n;
"""


@pytest.mark.slow
def test_concurrent_processes_on_fresh_database_apply_once(shared_target):
    dialect, target = shared_target
    applied = run_concurrently(dialect, target)
    assert sorted(applied) == [[]] * (PROCESSES - 1) + [all_versions(dialect)]
    assert_recorded_once(dialect, target, all_versions(dialect))


@pytest.mark.slow
def test_concurrent_processes_apply_a_new_migration_once(shared_target, sql_copy):
    dialect, target = shared_target
    first = Database(dialect, target)
    first.migrate(sql_copy)  # the tracking table exists: each process reads before it writes
    first.conn.close()
    (sql_copy / dialect / "002_add_notes.sql").write_text(SLOW_MIGRATION)
    applied = run_concurrently(dialect, target, root=sql_copy)
    assert sorted(applied) == [[]] * (PROCESSES - 1) + [[2]]
    assert_recorded_once(dialect, target, [1, 2])
    database = Database(dialect, target)
    assert database.rows("SELECT count(*) FROM notes") == [(200_000,)]
    database.conn.close()


@pytest.mark.slow
def test_concurrent_tier_start_ups_succeed(shared_target):
    dialect, target = shared_target
    run_concurrently(dialect, target, via_tier=True)
    assert_recorded_once(dialect, target, all_versions(dialect))
