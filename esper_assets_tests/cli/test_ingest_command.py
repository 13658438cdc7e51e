"""`esper ingest` and `esper demo` on a landing zone with bad files: one row per file,
the problem in one line, exit 1 (ingest) when a file failed, and none of Dagster's
stack traces on the terminal (they stay in each run's event log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from click.testing import CliRunner

from esper_assets.cli import main
from esper_assets.flows import wiring
from esper_assets.flows.wiring import landing_zone
from esper_assets.runner import dagster_checkpoint
from esper_assets.settings import SERVICE_VARIABLES, Settings
from esper_assets.storage.chunks import object_key

NEGATIVE_WIDTH = b"name: bad\nversion: 1.0.0\ninput_shape: [4]\nlayers:\n  - {op: linear, out_features: -3}\n"  # fmt: skip
BAD_FILE_PROBLEM = "layers[0].out_features: must be a positive integer, got -3"
# What Dagster prints on the console for a failed step or run.
DAGSTER_NOISE = ("Traceback", "Stack Trace", "STEP_FAILURE", "RUN_FAILURE", "dagster - ERROR")


def blueprint(name: str, parent: str | None = None, width: int = 8) -> bytes:
    doc = {"name": name, "version": "1.0.0", "input_shape": [4],
           "layers": [{"op": "linear", "out_features": width}, {"op": "relu"}]}  # fmt: skip
    if parent:
        doc["parent"] = parent
    return json.dumps(doc).encode()


@pytest.fixture
def landing(esper_home):
    return landing_zone(Settings.from_env())


def land_good_and_bad(landing) -> None:
    landing.put("base.json", blueprint("base"))
    landing.put("child.json", blueprint("child", parent="base@1.0.0"))
    landing.put("bad.yaml", NEGATIVE_WIDTH)
    landing.put("broken.json", b"{not json")
    landing.put("bad name.txt", b"hello")


def ingest_json(expect_exit: int) -> dict:
    result = CliRunner().invoke(main, ["ingest", "--json"])
    assert result.exit_code == expect_exit, (result.stdout, result.stderr, result.exception)
    for noise in DAGSTER_NOISE:
        assert noise not in result.stderr, result.stderr
    return json.loads(result.stdout)  # stdout holds the JSON document alone


@pytest.mark.slow
def test_ingest_reports_every_file_once_and_exits_1_when_one_failed(landing):
    land_good_and_bad(landing)
    report = ingest_json(expect_exit=1)
    assert report["landing"] == landing.location
    by_file = {f["file"]: f for f in report["files"]}
    assert sorted(by_file) == sorted(["base.json", "child.json", "bad.yaml", "broken.json",
                                      "bad name.txt"])  # fmt: skip
    assert {k: f["status"] for k, f in by_file.items()} == {
        "base.json": "success", "child.json": "success", "bad.yaml": "failed",
        "broken.json": "failed", "bad name.txt": "rejected",
    }  # fmt: skip
    assert report["failed"] == 3
    for name in ("base.json", "child.json"):
        good = by_file[name]
        assert good["checks"] == {"blueprint_is_valid": True, "kernel_round_trip": True}
        assert good["problem"] == "" and len(good["run_id"]) == 36
    bad = by_file["bad.yaml"]
    assert BAD_FILE_PROBLEM in bad["problem"] and "bad.yaml" in bad["problem"]
    assert bad["checks"] == {"blueprint_is_valid": False}
    assert "invalid JSON" in by_file["broken.json"]["problem"]
    rejected = by_file["bad name.txt"]
    assert "not a blueprint file" in rejected["problem"] and "rejected" in rejected["problem"]
    assert rejected["run_id"] == ""
    for f in report["files"]:
        assert "\n" not in f["problem"]
    # Dagster's own account, stack trace included, is in the failed run's event log.
    with dg.DagsterInstance.from_config(report["dagster_home"]) as instance:
        [failure] = instance.all_logs(bad["run_id"], of_type=dg.DagsterEventType.STEP_FAILURE)
        assert failure.dagster_event.event_specific_data.error.stack

    again = ingest_json(expect_exit=0)  # nothing new: nothing run, nothing failed
    assert again["files"] == [] and again["failed"] == 0
    landing.put("bad.yaml", NEGATIVE_WIDTH.replace(b"-3", b"3"))  # fixed and landed again
    fixed = ingest_json(expect_exit=0)
    assert [(f["file"], f["status"]) for f in fixed["files"]] == [("bad.yaml", "success")]


@pytest.mark.slow
def test_ingest_on_a_terminal_prints_a_table_and_no_stack_traces(landing, esper_home):
    """A real process, so what reaches stdout and stderr is what a user sees."""
    land_good_and_bad(landing)
    env = {k: v for k, v in os.environ.items() if k not in (*SERVICE_VARIABLES, "DAGSTER_HOME")}
    env["ESPER_HOME"] = str(esper_home)
    done = subprocess.run(
        [sys.executable, "-m", "esper_assets.cli", "ingest"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    for noise in DAGSTER_NOISE:
        assert noise not in done.stderr and noise not in done.stdout, done.stderr
    assert done.stderr.strip() == "", done.stderr
    rows = {
        line.split("│")[1].strip(): line
        for line in done.stdout.splitlines()
        if line.startswith("│") and line.split("│")[1].strip()
    }
    assert set(rows) == {"base.json", "child.json", "bad.yaml", "broken.json", "bad name.txt"}
    assert "success" in rows["base.json"] and "failed" in rows["bad.yaml"]
    assert "rejected" in rows["bad name.txt"]
    flat = " ".join(done.stdout.replace("│", " ").split())
    assert BAD_FILE_PROBLEM in flat  # the problem itself, as the check reported it
    assert "3 of 5 file(s) failed" in flat and "make dev" in flat


def test_ingest_with_nothing_landed_says_so(esper_home):
    result = CliRunner().invoke(main, ["ingest"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert "nothing new" in result.stdout


def test_ingest_refuses_a_landing_zone_it_cannot_use_in_one_line(esper_home, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    root = Settings.from_env().landing
    os.makedirs(root)
    os.symlink(tmp_path / "elsewhere", os.path.join(root, "blueprints"))
    result = CliRunner().invoke(main, ["ingest"])
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "symlink" in message and "ESPER_LANDING" in message
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_ingest_from_an_s3_landing_zone(esper_home, monkeypatch, s3_endpoint, s3_bucket):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("ESPER_LANDING", f"s3://{s3_bucket}/in")
    landing = landing_zone(Settings.from_env())
    landing.put("base.json", blueprint("base"))
    landing.put("bad.yaml", NEGATIVE_WIDTH)
    report = ingest_json(expect_exit=1)
    assert report["landing"] == f"s3://{s3_bucket}/in/blueprints/"
    by_file = {f["file"]: f for f in report["files"]}
    assert by_file["base.json"]["status"] == "success"
    assert BAD_FILE_PROBLEM in by_file["bad.yaml"]["problem"]


@pytest.mark.slow
def test_demo_with_bad_files_lists_each_failed_file_in_one_line(landing):
    landing.put("bad.yaml", NEGATIVE_WIDTH)
    landing.put("bad name.txt", b"hello")
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 2, (result.stdout, result.stderr)
    for noise in DAGSTER_NOISE:
        assert noise not in result.stderr and noise not in result.stdout, result.stderr
    assert "{'partitions'" not in result.stderr  # no Python dict dump
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: demo self-check failed: 2 landed file(s) did not go through:"
    [bad] = [line for line in lines if line.strip().startswith("bad.yaml")]
    assert "(run " in bad and " failed: " in bad and BAD_FILE_PROBLEM in bad
    [rejected] = [line for line in lines if line.strip().startswith("bad name.txt")]
    assert "rejected: " in rejected and "not a blueprint file" in rejected
    assert len(lines) == 4  # the headline, one line per file, where the full logs are
    # The table on stdout has the same rows, with the example files beside them.
    flat = " ".join(result.stdout.replace("│", " ").split())
    assert BAD_FILE_PROBLEM in flat and "mlp_base.json" in flat


# -- checkpoints: what training saved and what landed under checkpoints/ ------------------
def save_checkpoint(settings: Settings, run: str, step: int) -> str:
    with wiring.open_checkpoints(settings) as store:
        return store.save(run, step, {"model": f"{run} {step} ".encode() * 100}).asset_id


def land_checkpoint(settings: Settings, run: str, step: int) -> Path:
    """A folder another tool dropped: its files, then manifest.json (written last)."""
    folder = Path(settings.landing) / "checkpoints" / run / str(step)
    folder.mkdir(parents=True)
    (folder / "m.bin").write_bytes(b"external weights " * 64)
    (folder / "manifest.json").write_text(json.dumps({"components": {"model": "m.bin"}}))
    return folder


def test_ingest_reports_saved_and_landed_checkpoints_once(esper_home):
    settings = Settings.from_env()
    saved = save_checkpoint(settings, "train", 0)
    land_checkpoint(settings, "ext", 5)
    report = ingest_json(expect_exit=0)["checkpoints"]
    reported = {(r["run"], r["step"], r["asset_id"]) for r in report["reported"]}
    assert reported == {("train", 0, saved), ("ext", 5, "checkpoint:ext:5")}
    assert report["checks"] == {saved: True, "checkpoint:ext:5": True}
    assert report["problems"] == {}
    with dg.DagsterInstance.from_config(str(esper_home / "dagster")) as instance:
        assert dagster_checkpoint(instance, "ext", "checkpoint:ext:5")["step"] == 5

    assert ingest_json(expect_exit=0)["checkpoints"]["reported"] == []  # reported once
    save_checkpoint(settings, "train", 1)
    text = CliRunner().invoke(main, ["ingest"])
    assert text.exit_code == 0, (text.stdout, text.stderr)
    flat = " ".join(text.stdout.split())
    assert "checkpoints reported to Dagster: 1 (train@1); restorable: 1 of 1 verified" in flat
    quiet = CliRunner().invoke(main, ["ingest"])
    assert "no new checkpoints" in quiet.stdout and quiet.exit_code == 0


def test_ingest_exits_1_naming_a_checkpoint_that_is_not_restorable(esper_home):
    settings = Settings.from_env()
    saved = save_checkpoint(settings, "broken", 0)
    with wiring.open_checkpoints(settings) as store:
        address = store.show("broken")["components"]["model"]["files"][0]["chunks"][0][0]
    objects = wiring.object_store(settings)
    damaged = bytearray(objects.get(object_key(address)))
    damaged[-1] ^= 0xFF
    objects.put(object_key(address), bytes(damaged))

    text = CliRunner().invoke(main, ["ingest"])
    assert text.exit_code == 1, (text.stdout, text.stderr)
    flat = " ".join(text.stdout.split())
    assert "restorable: 0 of 1 verified" in flat
    assert f"{saved} is not restorable:" in flat and address in flat and "make dev" in flat
