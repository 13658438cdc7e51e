"""The benchmarks' plumbing, on small sizes: each measures esper against the raw
client in the same run (cache: cachetools, sqlite3; repository: a raw bulk write),
on the embedded default."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import pytest

from esper_assets.bench import cache as cache_bench
from esper_assets.settings import Settings


def test_bench_pieces_compare_against_raw_clients(esper_home):
    with cache_bench.bench_env(Settings.from_env()) as env:
        l1 = cache_bench.bench_l1(env, rounds=5)
        l3 = cache_bench.bench_l3(env, rounds=5)
        l2 = cache_bench.bench_l2(env, rounds=5)
    assert (
        l1.ours_us > 0
        and l1.raw_us > 0
        and l1.ratio == pytest.approx(l1.ours_us / l1.raw_us, rel=0.01)
    )
    assert l3.raw_label == "sqlite3 SELECT" and l3.ratio is not None
    assert l2.ok is None and l2.note.startswith("skipped")


def test_zipf_replay_counts_hits_for_both_policies():
    result = cache_bench.bench_zipf(n_ids=5_000, length=30_000)
    assert 0 < result["lru_hit_ratio"] < 1 and 0 < result["tinylfu_hit_ratio"] < 1
    assert result["gain_points"] == pytest.approx(
        (result["tinylfu_hit_ratio"] - result["lru_hit_ratio"]) * 100, abs=0.02
    )


def test_repository_bench_measures_against_a_raw_bulk_write(tmp_path):
    from esper_assets.bench import repository as repository_bench
    from esper_assets.storage import AssetRepository, DirectoryObjectStore

    repo = AssetRepository(
        sqlite_path=str(tmp_path / "b.sqlite3"), object_store=DirectoryObjectStore(tmp_path / "o")
    )
    with repo:
        result = repository_bench.bench_backend(repo, n=300, repeats=3, progress=lambda _: None)
        assert repo.get_usage_analytics()["total_assets"] == 300 + 3  # bulk + the timed creates
        # The raw twin table is gone again: asked of the file itself, on a connection of its own.
        with closing(sqlite3.connect(tmp_path / "b.sqlite3")) as conn:
            tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
        assert "assets" in tables and "raw_assets" not in tables
    assert result["bulk_ratio"] == pytest.approx(
        result["bulk_create_per_s"] / result["raw_bulk_per_s"], rel=0.01
    )
    assert set(result["search_p50_ms"]) == {
        "by name",
        "type + tag, top 20 by compile time",
        "properties containment, 20",
        "children of a parent",
    }
    assert all(isinstance(v, bool) for v in result["targets"].values())


def test_cache_bench_reports_l2_at_kernel_sizes_and_cold_get_many(
    esper_home, monkeypatch, redis_server_url
):
    monkeypatch.setenv("ESPER_REDIS_URL", redis_server_url)
    with cache_bench.bench_env(Settings.from_env()) as env:
        rows = [cache_bench.bench_l2(env, rounds=3, size=size) for size in (4096, 256 << 10)]
        cold = cache_bench.bench_cold_get_many(env, rounds=3, n=20)
    for row in [*rows, cold]:
        assert row.ours_us > 0 and row.raw_us > 0 and isinstance(row.ok, bool)
        assert row.as_dict()["ratio"] == pytest.approx(row.ours_us / row.raw_us, rel=0.01)
    assert [r.name for r in rows] == ["L2 hit p50 (4 KiB)", "L2 hit p50 (256 KiB)"]
    assert rows[0].target == "<= 1.25x" and cold.target == "<= 1.5x"
    assert cold.raw_label == "redis-py MGET"


def test_cache_bench_on_a_cluster_compares_with_redis_py_cluster_calls(
    esper_home, monkeypatch, redis_cluster_url
):
    monkeypatch.setenv("ESPER_REDIS_URL", redis_cluster_url)
    with cache_bench.bench_env(Settings.from_env()) as env:
        row = cache_bench.bench_l2(env, rounds=3, size=64 << 10)
        cold = cache_bench.bench_cold_get_many(env, rounds=3, n=40)  # ids on every node
    assert env.label == "embedded-cluster"
    assert (row.raw_label, cold.raw_label) == (
        "redis-py cluster GET",
        "redis-py cluster mget_nonatomic",
    )
    for measured in (row, cold):
        assert measured.ours_us > 0 and measured.raw_us > 0 and isinstance(measured.ok, bool)
