"""``esper checkpoints ...`` through click's CliRunner, on the embedded default and on
PostgreSQL + S3 (the ESPER_* variables pointing at this test's schema and bucket)."""

from __future__ import annotations

import json

from click.testing import CliRunner
from safetensors.numpy import save_file

from esper_assets.cli import main
from esper_assets_tests.checkpoints.conftest import weights


def esper(*args: str):
    return CliRunner().invoke(main, ["checkpoints", *args])


def test_save_list_show_verify_restore(cli_backend, tmp_path):
    save_file(weights(3), str(tmp_path / "model.safetensors"))
    (tmp_path / "opt.bin").write_bytes(b"optimizer state" * 100)
    saved = esper("save", "--run", "r1", "--step", "7", f"model={tmp_path / 'model.safetensors'}",
                  f"optimizer={tmp_path / 'opt.bin'}", "--json")  # fmt: skip
    assert saved.exit_code == 0, saved.output
    assert json.loads(saved.stdout)["asset_id"] == "checkpoint:r1:7"

    listed = esper("list", "--json")
    assert [(r["run"], r["step"]) for r in json.loads(listed.stdout)] == [("r1", 7)]
    assert "r1" in esper("list").stdout  # the table

    shown = json.loads(esper("show", "--run", "r1", "--json").stdout)
    assert shown["components"]["model"]["files"][0]["tensors"] == 3
    assert "model.safetensors" in esper("show", "--run", "r1", "--step", "7").stdout

    verified = esper("verify", "--run", "r1", "--json")
    assert verified.exit_code == 0 and json.loads(verified.stdout)["ok"]

    dest = tmp_path / "out"
    restored = esper("restore", "--run", "r1", "--component", "optimizer", "--dest", str(dest))
    assert restored.exit_code == 0, restored.output
    assert (dest / "optimizer" / "opt.bin").read_bytes() == b"optimizer state" * 100
    assert not (dest / "model").exists()


def test_errors_are_one_line_and_exit_2(cli_backend, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    unknown = esper("show", "--run", "nope")
    assert unknown.exit_code == 2 and "no checkpoint for run 'nope'" in unknown.stderr
    bad = esper("save", "--run", "r", "--step", "1", "no-equals-sign")
    assert bad.exit_code == 2 and "NAME=PATH" in bad.stderr
    assert esper("save", "--run", "r", "--step", "1", f"f={tmp_path / 'f.bin'}").exit_code == 0
    twice = esper("save", "--run", "r", "--step", "1", f"f={tmp_path / 'f.bin'}")
    assert twice.exit_code == 2 and "already has a checkpoint" in twice.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    refused = esper("restore", "--run", "r", "--dest", str(tmp_path / "full"))
    assert refused.exit_code == 2 and "--force" in refused.stderr
    forced = esper("restore", "--run", "r", "--dest", str(tmp_path / "full"), "--force", "--json")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["bytes"] == 1
