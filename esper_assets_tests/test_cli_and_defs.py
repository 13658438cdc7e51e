"""The `esper` CLI, the cache benchmark's plumbing and the Dagster definitions,
all on the embedded default (a temporary ESPER_HOME, no services)."""

from __future__ import annotations

import json

import dagster as dg
import pytest
from click.testing import CliRunner

from esper_assets.bench import cache as cache_bench
from esper_assets.cli import main
from esper_assets.settings import Settings


def test_cache_demo_runs_on_the_embedded_default(esper_home):
    # `esper demo` now runs the Dagster pipeline (test_pipeline_cli.py); the
    # cache-only walk through the tiers is `esper cache demo`.
    result = CliRunner().invoke(main, ["cache", "demo", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    served = {s["id"]: s["served_by"] for s in report["steps"] if s["step"] == "get after L1 loss"}
    assert served == {
        "demo-kernel-0": "l3",
        "demo-kernel-large": "l4",
        "demo-kernel-missing": "missing",
    }
    assert report["stats"]["tiers"]["l3"]["entries"] == 9
    assert (esper_home / "esper.sqlite3").exists()


def test_cache_commands_share_state_across_invocations(esper_home):
    runner = CliRunner()
    assert runner.invoke(main, ["cache", "demo", "--json"]).exit_code == 0
    stats = json.loads(runner.invoke(main, ["cache", "stats", "--json"]).stdout)
    # What `cache demo` put, seen by a new invocation: 8 small kernels + the 3 MiB one
    # in L3 (the large one as a pointer row), and the large one's bytes in L4.
    assert stats["tiers"]["l3"]["entries"] == 9
    assert stats["tiers"]["l4"]["entries"] == 1
    health = runner.invoke(main, ["cache", "health", "--json"])
    assert health.exit_code == 0 and json.loads(health.output)["l3"]["status"] == "healthy"
    assert json.loads(runner.invoke(main, ["cache", "cleanup", "--json"]).output)["l3"] == 0


def test_bad_setting_is_one_clear_line_not_a_traceback(esper_home, monkeypatch):
    monkeypatch.setenv("ESPER_DATABASE_URL", "mysql://root:hunter2@db/esper")
    result = CliRunner().invoke(main, ["cache", "stats"])
    assert result.exit_code == 2
    assert "ESPER_DATABASE_URL" in result.output and "hunter2" not in result.output
    assert "Traceback" not in result.output


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


def test_dagster_definitions_load_and_maintenance_job_runs(esper_home):
    from esper_assets.defs import build_definitions

    defs = build_definitions()

    dg.Definitions.validate_loadable(defs)
    job = defs.get_job_def("cache_maintenance_job")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    removed = result.output_for_node("clean_kernel_cache")
    assert set(removed) == {"l1", "l3", "l4"}


def _seed_chain(esper_home) -> list[str]:
    from esper_assets.storage import AssetMetadata, AssetRepository

    with AssetRepository.from_env() as repo:
        base = repo.create_asset(
            AssetMetadata("blueprint", "mlp", "1.0.0", tags={"mlp"}, properties={"target": "cpu"}),
            b"a",
        )
        child = repo.create_asset(
            AssetMetadata("blueprint", "mlp-res", parent_id=base, tags={"mlp", "[bold]x"}), b"b"
        )
        kernel = repo.create_asset(AssetMetadata("kernel", "mlp-res-k", parent_id=child), b"k")
    return [base, child, kernel]


def test_assets_commands_on_the_embedded_default(esper_home):
    base, child, kernel = _seed_chain(esper_home)
    runner = CliRunner()
    found = json.loads(runner.invoke(main, ["assets", "search", "--tag", "mlp", "--json"]).output)
    assert {a["asset_id"] for a in found} == {base, child}
    by_property = json.loads(
        runner.invoke(
            main, ["assets", "search", "--property", '{"target": "cpu"}', "--json"]
        ).output
    )
    assert [a["asset_id"] for a in by_property] == [base]
    lineage = json.loads(runner.invoke(main, ["assets", "lineage", kernel, "--json"]).output)
    assert [a["asset_id"] for a in lineage["ancestors"]] == [child, base]
    table = runner.invoke(main, ["assets", "search", "--tag", "[bold]x"])
    assert table.exit_code == 0 and "[bold]x" in table.output  # data is printed, not read as markup
    assert (
        runner.invoke(main, ["assets", "deprecate", kernel, "--reason", "superseded"]).exit_code
        == 0
    )
    shown = json.loads(runner.invoke(main, ["assets", "show", kernel, "--json"]).output)
    assert shown["asset"]["state"] == "deprecated"
    assert [e["event"] for e in shown["audit"]] == ["created", "deprecated"]


def test_assets_commands_report_bad_input_in_one_line(esper_home):
    runner = CliRunner()
    missing = runner.invoke(main, ["assets", "show", "no-such-asset"])
    assert missing.exit_code == 2 and "no asset 'no-such-asset'" in missing.output
    bad_order = runner.invoke(main, ["assets", "search", "--order-by", "name; DROP TABLE assets"])
    assert bad_order.exit_code == 2 and "cannot order by" in bad_order.output
    bad_json = runner.invoke(main, ["assets", "search", "--property", "{not json"])
    assert bad_json.exit_code == 2 and "--property is not JSON" in bad_json.output


def test_repository_bench_measures_against_a_raw_bulk_write(tmp_path):
    from esper_assets.bench import repository as repository_bench
    from esper_assets.storage import AssetRepository, DirectoryObjectStore

    repo = AssetRepository(
        sqlite_path=str(tmp_path / "b.sqlite3"), object_store=DirectoryObjectStore(tmp_path / "o")
    )
    with repo:
        result = repository_bench.bench_backend(repo, n=300, repeats=3, progress=lambda _: None)
        assert repo.get_usage_analytics()["total_assets"] == 300 + 3  # bulk + the timed creates
        assert not repo._db.fetchall(
            repo._db._tier.thread_connection(),
            "SELECT name FROM sqlite_master WHERE name = 'raw_assets'",
        )
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


def test_dagster_s3_clients_are_bounded_like_the_librarys(esper_home, monkeypatch):
    """The code location's S3 client (L4 and the landing zone in Dagster runs) makes one
    attempt with the library's timeouts, not dagster-aws's 60 s and retries."""
    from esper_assets.defs.resources import resources_from_env

    monkeypatch.setenv("ESPER_S3_BUCKET", "esper-bounded")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    resources = resources_from_env()
    wanted = {key: resources[key] for key in ("object_store", "landing")}
    with dg.build_resources(wanted) as built:  # resolves the EnvVars, as a run does
        for resource in (built.object_store.s3, built.landing.s3):
            config = resource.get_client().meta.config
            assert (config.connect_timeout, config.read_timeout) == (2.0, 2.0)
            assert config.retries["total_max_attempts"] == 1
