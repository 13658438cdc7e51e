"""``esper bench pipeline``'s instances side by side: the same backfill on the embedded
instance and on the production one (deploy/dagster.yaml) in a throwaway PostgreSQL
database, which is gone afterwards. No timing is asserted."""

from __future__ import annotations

import psycopg
import pytest

from esper_assets.bench import pipeline as bench
from esper_assets.errors import ConfigError

CHECKS = {"blueprint_is_valid": True, "kernel_round_trip": True}


def bench_databases(server_url: str) -> set[str]:
    with psycopg.connect(server_url) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE 'esper_bench_dagster_%'"
        ).fetchall()
    return {name for (name,) in rows}


def test_the_backfill_runs_on_both_instances_and_the_database_is_dropped(pg_server_url):
    before = bench_databases(pg_server_url)

    result = bench.bench_backfill(5, ("embedded", "postgres"), pg_server_url)

    for kind in ("embedded", "postgres"):
        assert result[kind]["success"] and result[kind]["checks"] == CHECKS, result[kind]
        assert result[kind]["pipeline_s"] > 0
    assert result["postgres_vs_embedded"] > 0
    assert bench_databases(pg_server_url) == before


def test_the_postgres_instance_needs_a_server():
    with pytest.raises(ConfigError, match="--postgres-url or set ESPER_DATABASE_URL"):
        bench.bench_backfill(1, ("postgres",), None)
