"""Usage analytics: what the cache and the repository served, kept as Parquet and
asked with DuckDB.

- ``schema``: the Parquet contract (one schema, the hive layout, the histogram).
- ``events``: ``UsageRecorder``, aggregating use in process and flushing files.
- ``dataset``: reading the files back (local or S3), skipping damaged ones.
- ``query``: ``AnalyticsSession``, DuckDB with the views registered, read only.
- ``rollups``: the daily rollups the Dagster assets materialize (SQL in sql/analytics).

May import: ``esper_assets.errors``, ``settings``, ``storage``. Never Dagster.
"""
