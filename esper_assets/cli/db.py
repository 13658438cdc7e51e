"""``esper migrate``: the schema of the configured database (PostgreSQL, or the
embedded SQLite file)."""

from __future__ import annotations

import click

from esper_assets.cli.render import console
from esper_assets.settings import Settings


@click.command()
def migrate() -> None:
    """Apply pending schema migrations to the configured database."""
    from esper_assets.storage.db.migrations import migrate_postgres, migrate_sqlite

    settings = Settings.from_env()
    if settings.database_url:
        import psycopg

        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            applied = migrate_postgres(conn)
    else:
        import sqlite3

        settings.home.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(settings.sqlite_path, isolation_level=None)
        applied = migrate_sqlite(conn)
        conn.close()
    console.print(f"applied migrations: {applied or 'none pending'}")
