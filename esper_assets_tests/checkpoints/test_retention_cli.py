"""``esper checkpoints prune`` and ``gc`` through click's CliRunner, on the embedded
default and on PostgreSQL + S3: outputs, exit codes, and bad options (exit 2)."""

from __future__ import annotations

import json

import pytest

from esper_assets_tests.checkpoints.test_cli import esper


def save(tmp_path, run: str, step: int, loss: float | None = None) -> None:
    path = tmp_path / f"{run}-{step}.bin"
    path.write_bytes(f"state of {run} at {step} ".encode() * 200)
    result = esper("save", "--run", run, "--step", str(step), f"model={path}", "--json")
    assert result.exit_code == 0, result.output


def steps(run: str = "r") -> list[tuple[int, str]]:
    return [
        (r["step"], r["state"]) for r in json.loads(esper("list", "--run", run, "--json").stdout)
    ]


def test_prune_archives_then_deletes(cli_backend, tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, "r", step)
    dry = esper("prune", "--keep-last", "2", "--keep-days", "0", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.stdout)
    assert report["dry_run"] and sorted(report["archived"]) == ["checkpoint:r:1", "checkpoint:r:2"]
    assert steps() == [(1, "active"), (2, "active"), (3, "active"), (4, "active")]

    table = esper("prune", "--run", "r", "--keep-last", "2", "--keep-days", "0")
    assert table.exit_code == 0, table.output
    assert "kept 2, archived 2, deleted 0" in table.stdout
    assert steps() == [(1, "archived"), (2, "archived"), (3, "active"), (4, "active")]

    deleted = esper("prune", "--keep-last", "1", "--keep-every", "2", "--keep-days", "0",
                    "--delete", "--json")  # fmt: skip
    assert deleted.exit_code == 0, deleted.output
    assert sorted(json.loads(deleted.stdout)["deleted"]) == ["checkpoint:r:1", "checkpoint:r:3"]
    assert steps() == [(2, "archived"), (4, "active")]


def test_prune_keep_best_by_metric(cli_backend, tmp_path):
    from esper_assets.checkpoints import CheckpointStore

    with CheckpointStore.from_env() as store:
        for step, loss in ((1, 0.2), (2, 0.9), (3, 0.5)):
            store.save("m", step, {"model": f"m{step}".encode() * 100}, metrics={"loss": loss})
    best = esper("prune", "--keep-best", "1", "--metric", "loss", "--keep-last", "0",
                 "--keep-days", "0", "--dry-run", "--json")  # fmt: skip
    assert best.exit_code == 0, best.output
    assert sorted(json.loads(best.stdout)["kept"]) == ["checkpoint:m:1", "checkpoint:m:3"]
    higher = esper("prune", "--keep-best", "1", "--metric", "loss", "--higher-is-better",
                   "--keep-last", "0", "--keep-days", "0", "--dry-run", "--json")  # fmt: skip
    assert sorted(json.loads(higher.stdout)["kept"]) == ["checkpoint:m:2", "checkpoint:m:3"]


def test_gc_after_delete(cli_backend, tmp_path):
    for step in (1, 2):
        save(tmp_path, "r", step)
    assert esper("prune", "--keep-last", "1", "--keep-days", "0", "--delete").exit_code == 0
    # Within the default grace of 1 hour, the deleted step's chunks are spared.
    spared = json.loads(esper("gc", "--json").stdout)
    assert (spared["chunks_deleted"], spared["chunks_in_grace"]) == (0, 1)
    dry = esper("gc", "--grace-hours", "0", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.stdout)["dry_run"]
    table = esper("gc", "--grace-hours", "0")
    assert table.exit_code == 0, table.output
    assert "chunks_deleted" in table.stdout
    again = json.loads(esper("gc", "--grace-hours", "0", "--json").stdout)
    assert (again["chunks_deleted"], again["bytes_freed"]) == (0, 0)
    assert esper("verify", "--run", "r").exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--keep-last", "-1"], "--keep-last must be >= 0"),
        (["prune", "--keep-every", "0"], "--keep-every must be >= 1"),
        (["prune", "--keep-days", "-2"], "--keep-days must be >= 0"),
        (["prune", "--keep-best", "3"], "--keep-best needs --metric"),
        (["prune", "--metric", "loss"], "--metric is used only with --keep-best"),
        (["gc", "--grace-hours", "-1"], "--grace-hours must be >= 0"),
    ],
)
def test_bad_options_are_one_line_exit_2(cli_backend, args, message):
    result = esper(*args)
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_prune_and_gc_follow_the_configured_policy(cli_backend, tmp_path, monkeypatch):
    for step in (1, 2, 3):
        save(tmp_path, "r", step)
    monkeypatch.setenv("ESPER_CHECKPOINT_KEEP_LAST", "2")
    monkeypatch.setenv("ESPER_CHECKPOINT_KEEP_DAYS", "off")
    monkeypatch.setenv("ESPER_CHECKPOINT_RETENTION_ACTION", "delete")
    pruned = esper("prune", "--json")
    assert pruned.exit_code == 0, pruned.output
    assert json.loads(pruned.stdout)["deleted"] == ["checkpoint:r:1"]
    monkeypatch.setenv("ESPER_CHECKPOINT_GC_GRACE_HOURS", "0")
    collected = json.loads(esper("gc", "--json").stdout)
    assert collected["chunks_deleted"] == 1 and collected["chunks_in_grace"] == 0
    assert esper("prune", "--keep-last", "3", "--json").exit_code == 0  # options win
    monkeypatch.setenv("ESPER_CHECKPOINT_KEEP_LAST", "many")
    bad = esper("prune")
    assert bad.exit_code == 2 and "ESPER_CHECKPOINT_KEEP_LAST" in bad.stderr
