"""The `esper` pipeline commands (demo, lineage, bench pipeline) on the embedded
default: a temporary ESPER_HOME, every service variable unset, the embedded Dagster
instance under ESPER_HOME/dagster. JSON goes to stdout; Dagster's own log lines
go to stderr and must not get in the way of parsing it."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner

from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.cli import main
from esper_assets.defs import build_definitions, local_instance
from esper_assets.flows.checkpoints import Cursor
from esper_assets.runner.driver import location_daemon

CHECKS = {"blueprint_is_valid": True, "kernel_round_trip": True}
EXAMPLE_NAMES = sorted(path.name.split(".")[0] for path in example_blueprint_files())

pytestmark = pytest.mark.slow  # each test runs the pipeline: 6-16 s


def invoke_json(*args: str) -> dict:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    try:
        return json.loads(result.stdout)  # stdout alone: nothing but the JSON document
    except json.JSONDecodeError as exc:
        pytest.fail(f"`esper {' '.join(args)}` stdout is not JSON ({exc}):\n{result.stdout[:2000]}")


@pytest.fixture
def demo_report(esper_home) -> dict:
    return invoke_json("demo", "--json")


def test_demo_runs_the_pipeline_and_reports_it_as_json(demo_report, esper_home):
    report = demo_report
    assert sorted(report["landed"]) == sorted(p.name for p in example_blueprint_files())
    assert len(report["runs"]) == 12
    assert sorted(r["partitions"][0] for r in report["runs"]) == EXAMPLE_NAMES
    for run in report["runs"]:
        assert run["success"] and run["checks"] == CHECKS and run["error"] == "", run
    assert report["kernels_registered"] == report["kernels_fetched_from_cache"] == 12
    repository_ids = [step["asset_id"] for step in report["lineage"]]
    assert repository_ids == [step["repository_id"] for step in report["dagster_lineage"]]
    assert len(report["lineage"]) == 5  # the longest example chain: kernel + 4 blueprints
    assert [(s["type"], s["name"]) for s in report["lineage"]] == [
        ("kernel", "residual_mlp_ln_wide"), ("blueprint", "residual_mlp_ln_wide"),
        ("blueprint", "residual_mlp_ln"), ("blueprint", "residual_mlp"),
        ("blueprint", "mlp_base"),
    ]  # fmt: skip
    # Everything lives under ESPER_HOME: the repository/L3 file and the embedded instance.
    assert report["settings"]["home"] == str(esper_home.resolve())
    assert report["dagster_home"] == str(esper_home.resolve() / "dagster")
    assert (esper_home / "esper.sqlite3").is_file()
    assert (esper_home / "dagster" / "dagster.yaml").is_file()
    assert report["stats"]["tiers"]["l3"]["entries"] == 12
    checkpoint = report["checkpoint"]  # step 0 of the demo run, using the 12 kernels
    assert (checkpoint["run"], checkpoint["step"], checkpoint["kernels"]) == ("demo", 0, 12)
    assert checkpoint["restored_files"] == 1 and checkpoint["restored_equal"]
    assert checkpoint["parent_id"] is None
    assert checkpoint["dagster_agrees"] and checkpoint["dagster"]["step"] == 0


def test_demo_a_second_time_runs_nothing_new(demo_report, esper_home):
    again = invoke_json("demo", "--json")
    assert again["landed"] == []  # the example files are unchanged
    assert again["runs"] == []  # same content, same run keys: nothing to do
    assert again["kernels_registered"] == again["kernels_fetched_from_cache"] == 12
    first_ids = [s["asset_id"] for s in demo_report["lineage"]]
    assert [s["asset_id"] for s in again["lineage"]] == first_ids
    assert [s["repository_id"] for s in again["dagster_lineage"]] == first_ids
    # the next step of the demo run: its parent is step 0, and the layer that did not
    # change is not stored again
    checkpoint = again["checkpoint"]
    assert (checkpoint["step"], checkpoint["parent_id"]) == (1, "checkpoint:demo:0")
    assert checkpoint["stored_bytes"] < 0.6 * demo_report["checkpoint"]["stored_bytes"]
    assert checkpoint["restored_equal"]


def test_demo_ends_with_an_analytics_query_over_what_it_did(demo_report, esper_home):
    usage = demo_report["usage"]
    assert not usage["off"] and usage["skipped"] == []
    rows = {(r["source"], r["tier"]): r for r in usage["rows"]}
    # the demo read its 12 kernels back from the cache and its assets from the repository
    cache_reads = sum(r["requests"] for (source, _), r in rows.items() if source == "cache")
    assert cache_reads >= 12 and rows[("repository", "repository")]["requests"] > 0
    assert (esper_home / "objects" / "usage" / "events").is_dir()  # the hive layout, on disk


def test_demo_says_dagster_holds_its_checkpoint_and_fails_when_it_does_not(demo_report):
    shown = CliRunner().invoke(main, ["demo"])
    assert shown.exit_code == 0, (shown.stdout, shown.stderr)
    assert "checkpoint demo step 1:" in shown.stdout and "in Dagster: yes" in shown.stdout
    # A new_checkpoints cursor ahead of every save: the sensor reports nothing, so
    # Dagster's event log has no materialization of the step the demo saves next.
    ahead = Cursor(datetime(2100, 1, 1, tzinfo=UTC)).dump()
    with local_instance() as instance, location_daemon(build_definitions(), instance) as daemon:
        daemon.set_sensor_cursor("new_checkpoints", ahead)
    missed = CliRunner().invoke(main, ["demo"])
    assert missed.exit_code == 2, (missed.stdout, missed.stderr)
    assert "in Dagster: NO" in missed.stdout
    message = " ".join(missed.stderr.split())
    assert (
        "Dagster's event log has no materialization of checkpoints[demo] at the saved step (2)"
        in message
    )
    assert "sensor cursor new_checkpoints --delete" in message


def test_lineage_command_agrees_with_the_dagster_event_log(demo_report):
    data = invoke_json("lineage", "residual_mlp_ln_wide", "--json")
    assert data["agree"] is True
    assert [(s["type"], s["name"]) for s in data["repository"]] == [
        ("kernel", "residual_mlp_ln_wide"), ("blueprint", "residual_mlp_ln_wide"),
        ("blueprint", "residual_mlp_ln"), ("blueprint", "residual_mlp"),
        ("blueprint", "mlp_base"),
    ]  # fmt: skip
    ids = [s["asset_id"] for s in data["repository"]]
    assert ids == [s["repository_id"] for s in data["dagster"]]
    assert ids == [s["asset_id"] for s in demo_report["lineage"]]
    # And a chain of a different shape: conv_classifier -> conv_block -> conv_stem.
    conv = invoke_json("lineage", "conv_classifier", "--json")
    assert conv["agree"] is True
    names = [s["name"] for s in conv["repository"][1:]]
    assert names == ["conv_classifier", "conv_block", "conv_stem"]


def test_lineage_of_a_checkpoint_walks_its_kernels_to_their_blueprints(demo_report):
    data = invoke_json("lineage", "--checkpoint", "demo", "--json")
    assert data["checkpoint"]["asset_id"].startswith("checkpoint:demo:")
    chains = data["kernels"]
    assert len(chains) == 12  # the demo checkpoint uses every registered kernel
    for chain in chains:
        assert chain[0]["type"] == "kernel" and chain[1]["type"] == "blueprint"
        assert chain[1]["name"] == chain[0]["name"]  # a kernel's blueprint has its name
        assert all(step["type"] == "blueprint" for step in chain[1:])
    longest = max(chains, key=len)
    assert [s["name"] for s in longest] == [
        "residual_mlp_ln_wide", "residual_mlp_ln_wide", "residual_mlp_ln", "residual_mlp",
        "mlp_base",
    ]  # fmt: skip
    result = CliRunner().invoke(main, ["lineage", "--checkpoint", "no-such-run"])
    assert result.exit_code == 2 and "no checkpoint of run 'no-such-run'" in result.stderr


def test_lineage_of_an_unknown_name_is_one_line_not_a_traceback(demo_report):
    result = CliRunner().invoke(main, ["lineage", "nosuch"])
    assert result.exit_code != 0
    message = result.stderr.strip()
    assert "nosuch" in message and len(message.splitlines()) == 1, message
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_bench_pipeline_quick_writes_its_json(esper_home, tmp_path):
    out = tmp_path / "x.json"
    printed = invoke_json("bench", "pipeline", "--quick", "--out", str(out), "--json")
    written = json.loads(out.read_text())
    assert written == printed
    backfill, sensor = written["backfill"], written["sensor"]
    assert written["quick"] is True
    assert backfill["blueprints"] == 100
    embedded = backfill["embedded"]
    assert embedded["success"] is True and embedded["checks"] == CHECKS, backfill
    assert "postgres" not in backfill  # the embedded instance only, unless asked
    assert sensor["files_seen"] == 1000 and sensor["new_files"] == 100
    assert sensor["first_tick_requests"] == sensor["files_seen"]
    assert sensor["tick_with_new_requests"] == 100
    # The bench ran in its own temporary home: nothing landed in ours.
    assert not (esper_home / "esper.sqlite3").exists()


def small_blueprint(name: str, parent: str | None = None) -> bytes:
    doc = {"name": name, "version": "1.0.0", "input_shape": [4],
           "layers": [{"op": "linear", "out_features": 8}, {"op": "relu"}]}  # fmt: skip
    if parent:
        doc["parent"] = parent
    return json.dumps(doc).encode()


def test_lineage_finds_partitions_materialized_more_than_a_page_of_times(esper_home):
    """101 newer materializations of each blueprint partition (the child's file landed
    broken again and again, the parent re-registered as other versions) must not hide
    the ones the kernel was built from. Reported as runless events: seconds, not runs."""
    import dagster as dg

    from esper_assets.defs import build_definitions, local_instance
    from esper_assets.flows.wiring import landing_zone
    from esper_assets.runner import tick_and_run
    from esper_assets.settings import Settings

    settings = Settings.from_env()
    landing = landing_zone(settings)
    landing.put("base.json", small_blueprint("base"))
    landing.put("child.json", small_blueprint("child", parent="base@1.0.0"))
    instance = local_instance(settings)
    report = tick_and_run(build_definitions(), instance)
    assert [r.success for r in report.runs] == [True, True], report.runs
    before = invoke_json("lineage", "child", "--json")
    assert before["agree"] is True and len(before["dagster"]) == 3
    for i in range(101):
        for partition, metadata in (
            ("child", {"status": "invalid"}),
            ("base", {"status": "registered", "repository_id": f"another-version-{i}"}),
        ):
            instance.report_runless_asset_event(
                dg.AssetMaterialization("blueprints", partition=partition, metadata=metadata)
            )
    after = invoke_json("lineage", "child", "--json")
    assert after["agree"] is True, after
    assert [s["repository_id"] for s in after["dagster"]] == [
        s["repository_id"] for s in before["dagster"]
    ]
