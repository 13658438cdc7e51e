"""The pipeline commands: ``esper demo``, ``ingest``, ``lineage`` and ``dagster-home``.
They run the Dagster pipeline through :mod:`esper_assets.runner` and print its report."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from esper_assets.cli.render import console, emit, self_check, stats_table, status
from esper_assets.settings import Settings

RUN_LOGS = (
    "Each run's full event log, Dagster's stack traces included, is in the Dagster UI: "
    "`make dev` (or DAGSTER_HOME=$(esper dagster-home) dagster dev), Runs, the run id."
)
STATUS_STYLE = {"success": "green", "failed": "red", "rejected": "red", "waiting": "yellow"}


# -- demo --------------------------------------------------------------------------------
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(as_json: bool) -> None:
    """Land the example blueprints and run the pipeline: sensor tick, ingest, compile, checks."""
    from esper_assets.runner import run_demo

    with status("running the blueprint pipeline", as_json):
        result = run_demo()
    emit(result, as_json, _render_demo)
    failed = _failure_lines(result["files"])
    self_check(not failed, f"{len(failed)} landed file(s) did not go through:\n  "
               + "\n  ".join(failed) + f"\n{RUN_LOGS}")  # fmt: skip
    self_check(result["kernels_fetched_from_cache"] == result["kernels_registered"],
               "a registered kernel is missing from the cache")  # fmt: skip
    self_check(_lineages_agree(result["lineage"], result["dagster_lineage"]),
               "the repository and the Dagster event log disagree about lineage")  # fmt: skip
    checkpoint = result["checkpoint"]
    self_check(checkpoint["restored_equal"],
               "the demo checkpoint did not restore to the tensors it saved")  # fmt: skip
    self_check(checkpoint["dagster_agrees"],
               f"Dagster's event log has no materialization of checkpoints[{checkpoint['run']}] "
               f"at the saved step ({checkpoint['step']}); if the new_checkpoints sensor's "
               f"cursor is ahead, delete it (DAGSTER_HOME={result['dagster_home']} dagster "
               "sensor cursor new_checkpoints --delete -w workspace.yaml) and run it again")  # fmt: skip
    usage = result["usage"]
    self_check(usage["off"] or bool(usage["rows"]),
               "the analytics query over the usage files found nothing, although the "
               "demo's cache and repository just served reads: see esper analytics query")  # fmt: skip


def _lineages_agree(repository: list[dict], dagster: list[dict]) -> bool:
    return [s["asset_id"] for s in repository] == [s["repository_id"] for s in dagster]


def _render_demo(data: dict[str, Any]) -> None:
    console.print(f"[bold]esper_assets pipeline demo[/] - state under {data['settings']['home']}")
    for key, value in data["settings"].items():
        console.print(f"  {key}: {escape(str(value))}")
    console.print(f"  dagster instance: {data['dagster_home']}")
    console.print(
        f"landed {len(data['landed'])} example blueprint file(s); sensor ticks: {data['ticks']}"
    )
    if data["files"]:
        console.print(_files_table(data["files"], "files the new_blueprints sensor picked up"))
    else:
        console.print("no new blueprint content since the last run (run keys dedupe it)")
    console.print(
        f"kernels registered: {data['kernels_registered']}, "
        f"fetched back from the cache: {data['kernels_fetched_from_cache']}"
    )
    console.print(stats_table(data["stats"]))
    if data["lineage"]:
        console.print("[bold]lineage[/] of the kernel with the longest chain (repository):")
        _print_chain(data["lineage"])
        agrees = _lineages_agree(data["lineage"], data["dagster_lineage"])
        console.print(f"  Dagster event log tells the same story: {_yes(agrees)}")
    _print_checkpoint(data["checkpoint"])
    _print_usage(data["usage"])


def _print_usage(usage: dict[str, Any]) -> None:
    if usage["off"]:
        console.print("usage analytics: off (ESPER_USAGE=off)")
        return
    flat = " ".join(usage["sql"].split())
    console.print(
        f'what the cache and the repository served: esper analytics query "{escape(flat)}"'
    )
    table = Table()
    for column in ("source", "tier", "ids", "requests", "bytes"):
        table.add_column(column, justify="left" if column in ("source", "tier") else "right")
    for row in usage["rows"]:
        table.add_row(*(str(row[c]) for c in ("source", "tier", "ids", "requests", "bytes")))
    console.print(table)
    for key, reason in usage["skipped"]:
        console.print(f"[yellow]skipped damaged usage file {escape(key)}: {escape(reason)}[/]")


def _print_checkpoint(c: dict[str, Any]) -> None:
    console.print(
        f"checkpoint {c['run']} step {c['step']}: {c['logical_bytes'] / 1024:.0f} KiB, "
        f"{c['stored_bytes'] / 1024:.0f} KiB of it new (unchanged tensors are stored once), "
        f"uses {c['kernels']} kernels; restored {c['restored_files']} file(s), "
        f"tensors equal: {_yes(c['restored_equal'])}; in Dagster: {_yes(c['dagster_agrees'])}"
    )


def _yes(condition: bool) -> str:
    return "yes" if condition else "[red]NO[/]"


# -- ingest ------------------------------------------------------------------------------
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ingest(as_json: bool) -> None:
    """Ingest what landed in ESPER_LANDING: tick the new_blueprints sensor and run what it
    asks for, until nothing new is left; then report the checkpoints saved or landed
    (under checkpoints/) since the last ingest to Dagster and verify each. One row per
    file; exits 1 if any file failed or a checkpoint is not restorable."""
    from esper_assets.runner import run_ingest

    with status("ingesting the landing zone", as_json):
        result = run_ingest()
    emit(result, as_json, _render_ingest)
    if result["failed"] or result["checkpoints"]["problems"]:
        sys.exit(1)


def _render_ingest(data: dict[str, Any]) -> None:
    console.print(
        f"[bold]esper ingest[/] - {escape(data['landing'])}; sensor ticks: {data['ticks']}"
    )
    if not data["files"]:
        console.print("nothing new in the landing zone (unchanged content is not run again)")
    else:
        console.print(_files_table(data["files"], "landed files"))
    if data["failed"]:
        console.print(
            f"[red]{data['failed']} of {len(data['files'])} file(s) failed.[/] {RUN_LOGS}"
        )
    elif data["files"]:
        console.print(f"all {len(data['files'])} file(s) ingested")
    _print_reported_checkpoints(data["checkpoints"])


def _print_reported_checkpoints(c: dict[str, Any]) -> None:
    """One line for what new_checkpoints reported, one more per checkpoint not restorable."""
    if not c["reported"]:
        console.print("no new checkpoints (saved, or landed under checkpoints/) to report")
        return
    steps = ", ".join(f"{r['run']}@{r['step']}" for r in c["reported"])
    restorable = sum(c["checks"].values())
    console.print(
        f"checkpoints reported to Dagster: {len(c['reported'])} ({escape(steps)}); "
        f"restorable: {restorable} of {len(c['checks'])} verified"
    )
    for asset_id, problem in c["problems"].items():
        console.print(f"  [red]{escape(asset_id)} is not restorable:[/] {escape(problem)}")
    if c["problems"]:
        console.print(RUN_LOGS)


def _files_table(files: list[dict[str, Any]], title: str) -> Table:
    """One row per landed file: name, run, status, checks, the problem in one line."""
    table = Table(title=title)
    for column in ("file", "run", "status", "checks", "problem"):
        table.add_column(column, overflow="fold")
    for f in files:
        checks = ", ".join(f"{k}={'passed' if v else 'FAILED'}" for k, v in f["checks"].items())
        style = STATUS_STYLE.get(f["status"], "default")
        table.add_row(escape(f["file"]), f["run_id"][:8], f"[{style}]{f['status']}[/]",
                      checks, escape(f["problem"]))  # fmt: skip
    return table


def _failure_lines(files: list[dict[str, Any]]) -> list[str]:
    """One line per file that did not go through: file (run), status, problem."""
    return [
        f"{f['file']}" + (f" (run {f['run_id'][:8]})" if f["run_id"] else "")
        + f" {f['status']}: {f['problem']}"
        for f in files
        if f["status"] != "success"
    ]  # fmt: skip


# -- lineage -----------------------------------------------------------------------------
@click.command()
@click.argument("name")
@click.option(
    "--checkpoint",
    is_flag=True,
    help="NAME is a training run: its checkpoint -> kernels -> blueprints.",
)
@click.option("--step", type=click.IntRange(min=0), help="With --checkpoint: this step.")
@click.option("--json", "as_json", is_flag=True)
def lineage(name: str, checkpoint: bool, step: int | None, as_json: bool) -> None:
    """The chain kernel -> blueprint version -> parent blueprints for blueprint NAME
    (with --checkpoint: the chains of the kernels run NAME's checkpoint uses)."""
    if checkpoint:
        _checkpoint_lineage(name, step, as_json)
        return
    from esper_assets.cli.repository import open_repository
    from esper_assets.defs import local_instance
    from esper_assets.flows.kernels import describe, lineage_chain
    from esper_assets.runner import dagster_lineage

    settings = Settings.from_env()
    with open_repository(settings) as repo:
        chain = [describe(m) for m in lineage_chain(repo, name)]
    from_dagster = dagster_lineage(local_instance(settings), name)
    data = {"repository": chain, "dagster": from_dagster,
            "agree": _lineages_agree(chain, from_dagster)}  # fmt: skip

    def render(_: Any) -> None:
        _print_chain(chain)
        if not from_dagster:
            console.print("(no Dagster materializations of this kernel in this instance)")
        elif data["agree"]:
            console.print("the Dagster event log records the same chain")
        else:
            console.print("[red]the Dagster event log records a different chain:[/]")
            for step in from_dagster:
                console.print(
                    escape(f"  {step['type']} {step['partition']} [{step['repository_id']}]")
                )

    emit(data, as_json, render)
    if from_dagster and not data["agree"]:
        sys.exit(1)


def _checkpoint_lineage(run_id: str, step: int | None, as_json: bool) -> None:
    from esper_assets.cli.repository import open_repository
    from esper_assets.flows.kernels import checkpoint_lineage, describe

    with open_repository(Settings.from_env()) as repo:
        checkpoint, chains = checkpoint_lineage(repo, run_id, step)
    data = {
        "checkpoint": {**describe(checkpoint), "step": checkpoint.properties.get("step")},
        "kernels": [[describe(m) for m in chain] for chain in chains],
    }

    def render(_: Any) -> None:
        console.print(_lineage_label(data["checkpoint"]))
        for chain in data["kernels"]:
            _print_chain(chain, indent=1)
        if not chains:
            console.print("  (this checkpoint names no registered kernel)")

    emit(data, as_json, render)


def _print_chain(chain: list[dict[str, Any]], indent: int = 0) -> None:
    """A kernel's chain, one step a line, each parent indented under its child."""
    for depth, step in enumerate(chain, start=indent):
        console.print("  " * depth + ("" if depth == 0 else "<- ") + _lineage_label(step))


def _lineage_label(step: dict[str, Any]) -> str:
    extra = f" kernel {step['kernel_id'][:18]}..." if step.get("kernel_id") else ""
    # checkpoint ids read as run:step; the others are hashes, shown by their start
    ident = step["asset_id"] if step["type"] == "checkpoint" else step["asset_id"][:12]
    return escape(f"{step['type']} {step['name']}@{step['version']} [{ident}]{extra}")


@click.command("dagster-home")
def dagster_home() -> None:
    """Print the embedded Dagster instance's folder (DAGSTER_HOME for `dagster dev`)."""
    from esper_assets.defs import embedded_dagster_home

    click.echo(embedded_dagster_home())


COMMANDS = (demo, ingest, lineage, dagster_home)
