"""`esper cache ...` and `esper assets ...` on the embedded default (a temporary
ESPER_HOME, no services); the benchmarks' plumbing is in tests/bench, the
Definitions the runner builds in tests/runner."""

from __future__ import annotations

import json

from click.testing import CliRunner

from esper_assets.cli import main


def test_cache_demo_runs_on_the_embedded_default(esper_home):
    # `esper demo` now runs the Dagster pipeline (test_pipeline_commands.py); the
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
