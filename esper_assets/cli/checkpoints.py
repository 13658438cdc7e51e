"""``esper checkpoints list|show|save|restore|verify|prune|gc``: the checkpoint store
the ``ESPER_*`` variables configure; ``prune`` applies a retention policy (the
configured one, changed by its options) and ``gc`` frees unreferenced chunks."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
from rich.table import Table

from esper_assets.cli.render import console, emit, measurements_table
from esper_assets.errors import EsperError, InvalidInput
from esper_assets.settings import Settings


def open_checkpoints(settings: Settings | None = None):
    """The checkpoint store, built by the wiring (a context manager). Imported when
    used: ``esper --help`` stays fast."""
    from esper_assets.flows import wiring

    return wiring.open_checkpoints(settings or Settings.from_env())


@click.group()
def checkpoints() -> None:
    """Save, restore, list and verify training checkpoints."""


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="checkpoints")
    for column in ("run", "step", "logical bytes", "stored bytes", "dedup", "parent", "created"):
        table.add_column(column)
    for r in rows:
        cells = (r["run"], r["step"], r["logical_bytes"], r["stored_bytes"], r["dedup_ratio"],
                 r["parent_id"] or "-", r["created_at"].isoformat(timespec="seconds"))  # fmt: skip
        table.add_row(*(escape(str(c)) for c in cells))
    return table


@checkpoints.command("list")
@click.option("--run", "run_id", help="Only this run's checkpoints.")
@click.option("--json", "as_json", is_flag=True)
def list_checkpoints(run_id: str | None, as_json: bool) -> None:
    """Every checkpoint (of one run), by run and step."""
    with open_checkpoints() as store:
        rows = store.list(run_id)
    emit(rows, as_json, lambda data: console.print(_table(data)))


@checkpoints.command("show")
@click.option("--run", "run_id", required=True)
@click.option("--step", type=int, help="Default: the run's latest step.")
@click.option("--chunks", "with_chunks", is_flag=True, help="Include the chunk lists.")
@click.option("--json", "as_json", is_flag=True)
def show(run_id: str, step: int | None, with_chunks: bool, as_json: bool) -> None:
    """One checkpoint's manifest: components, files, tensors, sizes, kernels."""
    from esper_assets.checkpoints.manifest import summary

    with open_checkpoints() as store:
        manifest = store.show(run_id, step)
    data = manifest if with_chunks else summary(manifest)
    emit(data, as_json, _render_manifest)


def _render_manifest(data: dict[str, Any]) -> None:
    rows = {k: data[k] for k in ("run", "step", "created_at", "logical_bytes", "stored_bytes",
                                 "chunk_count", "new_chunks", "kernels", "metrics")}  # fmt: skip
    console.print(measurements_table("checkpoint", rows))
    table = Table(title="components")
    for column in ("component", "kind", "file", "bytes", "tensors"):
        table.add_column(column)
    for name, component in data["components"].items():
        for f in component["files"]:
            tensors = f["tensors"] if isinstance(f["tensors"], int) else len(f["tensors"])
            cells = (name, component["kind"], f["path"], f["size"], tensors)
            table.add_row(*(escape(str(c)) for c in cells))
    console.print(table)


def _component(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise InvalidInput(f"components are NAME=PATH, got {text!r}")
    return name, Path(path)


@checkpoints.command("save")
@click.option("--run", "run_id", required=True)
@click.option("--step", type=int, required=True)
@click.option("--kernel", "kernels", multiple=True, help="A kernel id the run uses (repeatable).")
@click.argument("components", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
def save(run_id: str, step: int, kernels: tuple[str, ...], components: tuple[str, ...],
         as_json: bool) -> None:  # fmt: skip
    """Save files as a checkpoint: NAME=PATH... (a .safetensors file is split per tensor)."""
    parsed = dict(_component(c) for c in components)
    if len(parsed) != len(components):
        raise InvalidInput("each component name may be given once")
    with open_checkpoints() as store:
        info = store.save(run_id, step, parsed, kernels=kernels)
    result = {"asset_id": info.asset_id, "run": info.run_id, "step": info.step,
              "logical_bytes": info.logical_bytes, "stored_bytes": info.stored_bytes,
              "chunks": info.chunk_count, "new_chunks": info.new_chunks,
              "parent_id": info.parent_id}  # fmt: skip
    emit(result, as_json, lambda data: console.print(measurements_table("saved", data)))


@checkpoints.command("restore")
@click.option("--run", "run_id", required=True)
@click.option("--step", type=int, help="Default: the run's latest step.")
@click.option("--component", "components", multiple=True, help="Only this one (repeatable).")
@click.option("--dest", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="Restore into a non-empty directory.")
@click.option("--json", "as_json", is_flag=True)
def restore(run_id: str, step: int | None, components: tuple[str, ...], dest: Path,
            force: bool, as_json: bool) -> None:  # fmt: skip
    """Restore a checkpoint into DEST/<component>/<file>: all of it, or nothing."""
    with open_checkpoints() as store, ProgressBar(as_json) as progress:
        report = store.restore(run_id, step, components or None, dest, force, progress)
    emit(report.as_dict(), as_json, lambda data: console.print(
        f"restored {data['run']} step {data['step']}: {len(data['files'])} file(s), "
        f"{data['bytes']} bytes into {escape(data['dest'])}"))  # fmt: skip


class ProgressBar:
    """A rich bar fed by restore's (done, total) callback, shown from the first chunk
    (so a refused restore prints only its error); nothing under --json."""

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet
        self._bar: Progress | None = None

    def __enter__(self):
        return None if self._quiet else self._update

    def _update(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = Progress(
                "restoring", BarColumn(), DownloadColumn(), TransferSpeedColumn(), console=console
            )
            self._bar.start()
            self._task = self._bar.add_task("restore", total=total)
        self._bar.update(self._task, completed=done)

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.stop()


@checkpoints.command("verify")
@click.option("--run", "run_id", required=True)
@click.option("--step", type=int, help="Default: the run's latest step.")
@click.option("--sample", type=float, help="Re-hash this fraction of the chunks (default all).")
@click.option("--json", "as_json", is_flag=True)
def verify(run_id: str, step: int | None, sample: float | None, as_json: bool) -> None:
    """Check that a checkpoint is restorable: manifest, chunks present, hashes."""
    with open_checkpoints() as store:
        report = store.verify(run_id, step, sample)
    emit(report, as_json, lambda data: console.print(measurements_table("verify", data)))
    if not report["ok"]:
        raise EsperError(
            f"checkpoint {run_id} step {report['step']} is not restorable: "
            f"{len(report['missing'])} missing, {len(report['corrupt'])} corrupt chunk(s)"
        )


# -- retention ------------------------------------------------------------------------
def _at_least(option: str, value: float | None, low: float) -> None:
    if value is not None and value < low:
        raise InvalidInput(f"{option} must be >= {low:g}, not {value:g}")


# How prune spells flows.checkpoints.policy_with's keywords, for its error messages.
PRUNE_OPTIONS = {"keep_last": "--keep-last", "keep_every": "--keep-every",
                 "keep_newer_than_days": "--keep-days", "keep_best": "--keep-best",
                 "metric": "--metric"}  # fmt: skip


def _policy(settings: Settings, keep_last, keep_every, keep_days, keep_best, metric,
            higher_is_better: bool, delete: bool):  # fmt: skip
    """The configured policy with the options given on the command line instead."""
    from esper_assets.checkpoints import RetentionPolicy
    from esper_assets.flows.checkpoints import policy_with

    return policy_with(
        RetentionPolicy.from_settings(settings), keep_last=keep_last, keep_every=keep_every,
        keep_newer_than_days=keep_days, keep_best=keep_best, metric=metric,
        higher_is_better=higher_is_better, action="delete" if delete else None,
        names=PRUNE_OPTIONS,
    )  # fmt: skip


def _decisions(data: dict[str, Any]) -> None:
    table = Table(title="retention" + (" (dry run: nothing changed)" if data["dry_run"] else ""))
    for column in ("checkpoint", "decision", "reason"):
        table.add_column(column)
    decided = {**{a: "kept" for a in data["kept"]}, **{a: "archived" for a in data["archived"]},
               **{a: "deleted" for a in data["deleted"]}}  # fmt: skip
    for asset_id, reason in sorted(data["reasons"].items()):
        table.add_row(escape(asset_id), decided.get(asset_id, "unchanged"), escape(reason))
    console.print(table)
    console.print(f"kept {len(data['kept'])}, archived {len(data['archived'])}, "
                  f"deleted {len(data['deleted'])}; {data['chunks_archived']} chunk(s), "
                  f"{data['bytes_archived']} bytes moved under archive/")  # fmt: skip


@checkpoints.command("prune")
@click.option("--run", "run_id", help="Only this run (default: every run).")
@click.option(
    "--keep-last",
    type=int,
    help="Keep each run's newest N steps (default: ESPER_CHECKPOINT_KEEP_LAST, else 5).",
)
@click.option(
    "--keep-every",
    type=int,
    help="Keep the steps divisible by N (default: ESPER_CHECKPOINT_KEEP_EVERY, else off).",
)
@click.option(
    "--keep-days",
    type=float,
    help="Keep what is newer than D days (default: ESPER_CHECKPOINT_KEEP_DAYS, else 7).",
)
@click.option("--keep-best", type=int, help="Keep the best K by --metric.")
@click.option("--metric", help="The manifest metric --keep-best ranks by.")
@click.option("--higher-is-better", is_flag=True, help="For --metric (default: lower).")
@click.option(
    "--delete",
    is_flag=True,
    help="Delete what falls out (default: ESPER_CHECKPOINT_RETENTION_ACTION, else archive).",
)
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--json", "as_json", is_flag=True)
def prune(run_id, keep_last, keep_every, keep_days, keep_best, metric, higher_is_better,
          delete, dry_run, as_json) -> None:  # fmt: skip
    """Apply retention: a checkpoint any rule keeps stays (a run's newest always);
    the rest are archived (still restorable) or, with --delete, deleted."""
    from esper_assets.checkpoints import apply_retention

    settings = Settings.from_env()
    policy = _policy(settings, keep_last, keep_every, keep_days, keep_best, metric,
                     higher_is_better, delete)  # fmt: skip
    with open_checkpoints(settings) as store:
        report = apply_retention(store, policy, run_id=run_id, dry_run=dry_run)
    emit(report.as_dict(), as_json, _decisions)


@checkpoints.command("gc")
@click.option("--grace-hours", type=float,
              help="Spare unreferenced chunks a save touched within this many hours "
                   "(default: ESPER_CHECKPOINT_GC_GRACE_HOURS, else 1).")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Count what would be freed; delete nothing.")
@click.option("--json", "as_json", is_flag=True)
def gc(grace_hours: float, dry_run: bool, as_json: bool) -> None:
    """Delete the chunks no live (not deleted) checkpoint references."""
    from esper_assets.checkpoints.retention import collect_garbage, grace_from_settings

    _at_least("--grace-hours", grace_hours, 0)
    settings = Settings.from_env()
    grace = grace_from_settings(settings) if grace_hours is None else timedelta(hours=grace_hours)
    with open_checkpoints(settings) as store:
        report = collect_garbage(store, grace, dry_run=dry_run)
    title = "gc (dry run: nothing deleted)" if dry_run else "gc"
    emit(report.as_dict(), as_json, lambda data: console.print(measurements_table(title, data)))
