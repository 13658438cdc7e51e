"""Database plumbing shared by the kernel cache's L3 and the asset repository: the
PostgreSQL connection pool with deadlines and its error mapping (``postgres``), and
numbered SQL migrations for PostgreSQL and SQLite (``migrations``).

May import: ``esper_assets.errors``. Nothing else in ``storage``.
"""
