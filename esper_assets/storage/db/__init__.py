"""Database plumbing shared by the kernel cache's L3 and the asset repository.

- ``postgres``: the PostgreSQL connection pool with deadlines (``ConnectionPool``,
  ``session()`` for a connection whose errors read as ours) and the mapping of
  psycopg errors (``postgres_errors``).
- ``sqlite``: per-thread connections to one SQLite file in WAL mode (``SqliteFile``),
  ``BEGIN IMMEDIATE`` write transactions and the mapping of sqlite3 errors
  (``sqlite_errors``).
- ``migrations``: numbered SQL migrations for PostgreSQL and SQLite.

Both error mappings take a ``Refine`` hook (below), through which a caller names a
more precise error for some driver errors (the repository: a unique violation is an
``AssetConflict``).

May import: ``esper_assets.errors``. Nothing else in ``storage``.
"""

from collections.abc import Callable

# Given a driver error, the error of ours it means to the caller, or None for the
# common mapping.
Refine = Callable[[Exception], Exception | None]


def raise_refined(exc: Exception, refine: Refine | None) -> None:
    """Raise the error ``refine`` names for driver error ``exc``, if it names one."""
    refined = refine(exc) if refine is not None else None
    if refined is not None:
        raise refined from exc
