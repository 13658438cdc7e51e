"""Numbered plain-SQL migrations: ``sql/<dialect>/NNN_name.sql``.

Applied in order, each in its own transaction together with its row in
``esper_migrations``; safe when several processes start at once (PostgreSQL: an
advisory lock per schema; SQLite: ``BEGIN IMMEDIATE`` takes the write lock).
A migration that was edited after it was applied is refused: add a new file.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from esper_assets.errors import MigrationError

_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

_TRACKING_TABLE = """
CREATE TABLE IF NOT EXISTS esper_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    checksum   TEXT NOT NULL,
    applied_at TEXT NOT NULL
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def sql_root() -> Path:
    """The ``sql/`` folder: packaged inside the wheel, or the repository's own."""
    here = Path(__file__).resolve()  # esper_assets/storage/db/migrations.py
    packaged = here.parents[2] / "sql"
    return packaged if packaged.is_dir() else here.parents[3] / "sql"


def load_migrations(dialect: str, root: Path | None = None) -> list[Migration]:
    folder = (root or sql_root()) / dialect
    if not folder.is_dir():
        raise MigrationError(f"no migrations folder {folder}; is the package installed completely?")
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNN_lower_snake.sql")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise MigrationError(
            f"{folder}: migration numbers must run 001, 002, ... without gaps: {versions}"
        )
    return migrations


def _check_applied(applied: dict[int, str], migrations: list[Migration]) -> list[Migration]:
    for m in migrations:
        if m.version in applied and applied[m.version] != m.checksum:
            raise MigrationError(
                f"migration {m.version:03d}_{m.name} changed after it was applied; "
                "never edit an applied migration, add a new numbered file instead"
            )
    return [m for m in migrations if m.version not in applied]


def migrate_postgres(conn, migrations: list[Migration] | None = None) -> list[int]:
    """Apply pending migrations on a psycopg connection; return the versions applied."""
    migrations = load_migrations("postgres") if migrations is None else migrations
    with conn.transaction():
        # One lock per schema so parallel test schemas don't queue behind each other.
        conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext(current_schema() || ':esper_migrations'))"
        )
        # Only DDL when needed: a read-only session (replica, read-only role) with
        # nothing to apply must still be able to open the cache and read.
        exists = conn.execute(
            "SELECT to_regclass(format('%I.esper_migrations', current_schema()))"
        ).fetchone()[0]
        if exists is None:
            conn.execute(_TRACKING_TABLE)
        applied = dict(conn.execute("SELECT version, checksum FROM esper_migrations").fetchall())
        pending = _check_applied(applied, migrations)
        for m in pending:
            conn.execute(m.sql, prepare=False)  # a script of many statements
            conn.execute(
                "INSERT INTO esper_migrations VALUES (%s, %s, %s, now()::text)",
                (m.version, m.name, m.checksum),
            )
    return [m.version for m in pending]


def migrate_sqlite(
    conn: sqlite3.Connection, migrations: list[Migration] | None = None
) -> list[int]:
    """Apply pending migrations on an autocommit sqlite3 connection."""
    migrations = load_migrations("sqlite") if migrations is None else migrations
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_TRACKING_TABLE)
        applied = dict(conn.execute("SELECT version, checksum FROM esper_migrations").fetchall())
        pending = _check_applied(applied, migrations)
        for m in pending:
            # executescript() would COMMIT first; run statement by statement instead.
            for statement in split_sqlite_script(m.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO esper_migrations VALUES (?, ?, ?, datetime('now'))",
                (m.version, m.name, m.checksum),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return [m.version for m in pending]


def split_sqlite_script(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            if buffer.strip():
                statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):
        raise MigrationError(
            f"unterminated SQL statement at the end of a migration: {buffer[:80]!r}"
        )
    return statements
