"""The ``esper`` command: demo, ingest, cache operations, migrations and benchmarks."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from esper_assets.errors import EsperError
from esper_assets.settings import Settings

# A pipe or CI log gets a wide fixed width so tables are not squeezed to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)


def _fail(exc: EsperError) -> None:
    # Text, not markup; one line per line of the message (the terminal wraps, not rich)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    sys.exit(2)


class EsperGroup(click.Group):
    """Turns EsperError into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EsperError as exc:
            _fail(exc)


@click.group(cls=EsperGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log what the storage layer does.")
def main(verbose: bool) -> None:
    """Esper assets: blueprints, kernels and checkpoints with a multi-tier cache."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _status(message: str, quiet: bool):
    """A spinner on the console, or nothing when the output is JSON."""
    from contextlib import nullcontext

    return nullcontext() if quiet else console.status(message)


def _emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def _stats_table(stats: dict[str, Any]) -> Table:
    table = Table(title="kernel cache")
    columns = [
        "tier",
        "hits",
        "misses",
        "errors",
        "corruptions",
        "skipped",
        "p50 us",
        "p99 us",
        "breaker",
        "entries",
        "bytes",
    ]
    for column in columns:
        table.add_column(column, justify="left" if column in ("tier", "breaker") else "right")
    for name, t in stats["tiers"].items():
        table.add_row(
            name,
            *(
                str(t.get(k, ""))
                for k in ("hits", "misses", "errors", "corruptions", "skipped", "p50_us", "p99_us")
            ),
            str(t.get("breaker", "-")),
            str(t.get("entries", "")),
            str(t.get("bytes", t.get("stored_bytes", ""))),
        )
    table.caption = (
        f"requests {stats['requests']}, hit rate {stats['overall_hit_rate']}, "
        f"lower-tier loads {stats['loads']}, write mode {stats['write_mode']}"
    )
    return table


# -- demo --------------------------------------------------------------------------------
@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def demo(as_json: bool) -> None:
    """Land the example blueprints and run the pipeline: sensor tick, ingest, compile, checks."""
    from esper_assets.runner.driver import run_demo

    with _status("running the blueprint pipeline", as_json):
        result = run_demo()
    _emit(result, as_json, _render_demo)
    failed = _failure_lines(result["files"])
    _check(not failed, f"{len(failed)} landed file(s) did not go through:\n  "
           + "\n  ".join(failed) + f"\n{RUN_LOGS}")  # fmt: skip
    _check(result["kernels_fetched_from_cache"] == result["kernels_registered"],
           "a registered kernel is missing from the cache")  # fmt: skip
    _check(_lineages_agree(result["lineage"], result["dagster_lineage"]),
           "the repository and the Dagster event log disagree about lineage")  # fmt: skip


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
    console.print(_stats_table(data["stats"]))
    if data["lineage"]:
        console.print("[bold]lineage[/] of the kernel with the longest chain (repository):")
        for depth, step in enumerate(data["lineage"]):
            console.print("  " * depth + ("" if depth == 0 else "<- ") + _lineage_label(step))
        agrees = _lineages_agree(data["lineage"], data["dagster_lineage"])
        console.print(
            f"  Dagster event log tells the same story: {'yes' if agrees else '[red]NO[/]'}"
        )


# -- ingest ------------------------------------------------------------------------------
RUN_LOGS = (
    "Each run's full event log, Dagster's stack traces included, is in the Dagster UI: "
    "`make dev` (or DAGSTER_HOME=$(esper dagster-home) dagster dev), Runs, the run id."
)
STATUS_STYLE = {"success": "green", "failed": "red", "rejected": "red", "waiting": "yellow"}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def ingest(as_json: bool) -> None:
    """Ingest what landed in ESPER_LANDING: tick the new_blueprints sensor and run what it
    asks for, until nothing new is left. One row per file; exits 1 if any file failed."""
    from esper_assets.runner.driver import run_ingest

    with _status("ingesting the landing zone", as_json):
        result = run_ingest()
    _emit(result, as_json, _render_ingest)
    if result["failed"]:
        sys.exit(1)


def _render_ingest(data: dict[str, Any]) -> None:
    console.print(
        f"[bold]esper ingest[/] - {escape(data['landing'])}; sensor ticks: {data['ticks']}"
    )
    if not data["files"]:
        console.print("nothing new in the landing zone (unchanged content is not run again)")
        return
    console.print(_files_table(data["files"], "landed files"))
    if data["failed"]:
        console.print(
            f"[red]{data['failed']} of {len(data['files'])} file(s) failed.[/] {RUN_LOGS}"
        )
    else:
        console.print(f"all {len(data['files'])} file(s) ingested")


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


def _lineage_label(step: dict[str, Any]) -> str:
    extra = f" kernel {step['kernel_id'][:18]}..." if step.get("kernel_id") else ""
    return escape(
        f"{step['type']} {step['name']}@{step['version']} [{step['asset_id'][:12]}]{extra}"
    )


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EsperError(f"demo self-check failed: {message}")


# -- cache -----------------------------------------------------------------------------
@main.group()
def cache() -> None:
    """Inspect and maintain the kernel cache configured by ESPER_* variables."""


@cache.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def cache_demo(as_json: bool) -> None:
    """Put kernels, read them back through the tiers, and show the stats."""
    from esper_assets.storage import PersistentKernelCache

    settings = Settings.from_env()
    steps: list[dict[str, Any]] = []
    with PersistentKernelCache.from_env() as cache:
        small = {f"demo-kernel-{i}": os.urandom(64 * 1024) for i in range(8)}
        large_id, large = "demo-kernel-large", os.urandom(3 << 20)
        for kernel_id, value in small.items():
            steps.append(
                {
                    "step": "put",
                    "id": kernel_id,
                    "bytes": len(value),
                    "tiers": cache.put(kernel_id, value),
                }
            )
        steps.append(
            {
                "step": "put",
                "id": large_id,
                "bytes": len(large),
                "tiers": cache.put(large_id, large),
            }
        )
        first = next(iter(small))
        _check(cache.get(first) == small[first], "L1 hit returned the wrong bytes")
        steps.append({"step": "get", "id": first, "served_by": "l1"})
        cache._drop_all_local()  # forget L1, as a fresh training process would start
        report = cache.warm_cache([first, large_id, "demo-kernel-missing"])
        for kernel_id, tier in report.items():
            steps.append({"step": "get after L1 loss", "id": kernel_id, "served_by": tier})
        _check(cache.get(large_id) == large, "large object came back different")
        steps.append({"step": "get", "id": large_id, "served_by": "l1 (promoted)"})
        stats = cache.get_stats(include_sizes=True)
        health = cache.health()
    result = {"settings": settings.describe(), "steps": steps, "stats": stats, "health": health}

    def render(data: dict[str, Any]) -> None:
        console.print(f"[bold]esper_assets demo[/] - state under {data['settings']['home']}")
        for key, value in data["settings"].items():
            console.print(f"  {key}: {value}")
        table = Table(title="what happened")
        for column in ("step", "kernel", "bytes", "tiers / served by"):
            table.add_column(column)
        for s in data["steps"]:
            where = ", ".join(s["tiers"]) if "tiers" in s else s["served_by"]
            table.add_row(s["step"], s["id"], str(s.get("bytes", "")), where)
        console.print(table)
        console.print(_stats_table(data["stats"]))
        console.print(
            "health: " + ", ".join(f"{k}={v['status']}" for k, v in data["health"].items())
        )

    _emit(result, as_json, render)


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True)
def cache_stats(as_json: bool) -> None:
    """Entries and bytes per tier, breaker states."""
    from esper_assets.storage import PersistentKernelCache

    with PersistentKernelCache.from_env() as c:
        stats = c.get_stats(include_sizes=True)
    _emit(stats, as_json, lambda s: console.print(_stats_table(s)))


@cache.command("health")
@click.option("--json", "as_json", is_flag=True)
def cache_health(as_json: bool) -> None:
    """Ping every tier."""
    from esper_assets.storage import PersistentKernelCache

    with PersistentKernelCache.from_env() as c:
        health = c.health()
    _emit(health, as_json, lambda h: [console.print(f"{k}: {v}") for k, v in h.items()])
    if any(v["status"] != "healthy" for v in health.values()):
        sys.exit(1)


@cache.command("cleanup")
@click.option("--json", "as_json", is_flag=True)
def cache_cleanup(as_json: bool) -> None:
    """Remove expired entries from every tier."""
    from esper_assets.storage import PersistentKernelCache

    with PersistentKernelCache.from_env() as c:
        removed = c.cleanup()
    _emit(removed, as_json, lambda r: console.print(f"removed expired entries: {r}"))


@cache.command("warm")
@click.option("--top", default=100, show_default=True, help="How many of the most used kernels.")
@click.option("--json", "as_json", is_flag=True)
def cache_warm(top: int, as_json: bool) -> None:
    """Load the most used kernels (by recorded access counts) into the fast tiers."""
    from rich.progress import track

    from esper_assets.storage import PersistentKernelCache

    report: dict[str, str] = {}
    with PersistentKernelCache.from_env() as c:
        ids = c.hottest(top)
        batches = [ids[i : i + 50] for i in range(0, len(ids), 50)]
        for batch in track(
            batches, description="warming", console=Console(stderr=True), disable=as_json
        ):
            report.update(c.warm_cache(batch))
    loaded = sum(1 for tier in report.values() if tier != "missing")
    _emit(report, as_json, lambda r: console.print(f"warmed {loaded} of {len(r)} kernel(s): {r}"))


@main.command()
def migrate() -> None:
    """Apply pending schema migrations to the configured database."""
    from esper_assets.storage.db.migrations import migrate_postgres, migrate_sqlite

    settings = Settings.from_env()
    if settings.database_url:
        import psycopg

        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            applied = migrate_postgres(conn)
    else:
        import sqlite3

        settings.home.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(settings.sqlite_path, isolation_level=None)
        applied = migrate_sqlite(conn)
        conn.close()
    console.print(f"applied migrations: {applied or 'none pending'}")


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def lineage(name: str, as_json: bool) -> None:
    """The chain kernel -> blueprint version -> parent blueprints for blueprint NAME."""
    from esper_assets.defs import local_instance
    from esper_assets.flows.kernels import describe, lineage_chain
    from esper_assets.runner.driver import dagster_lineage

    with _repository() as repo:
        chain = [describe(m) for m in lineage_chain(repo, name)]
    from_dagster = dagster_lineage(local_instance(), name)
    data = {"repository": chain, "dagster": from_dagster,
            "agree": _lineages_agree(chain, from_dagster)}  # fmt: skip

    def render(_: Any) -> None:
        for depth, step in enumerate(chain):
            console.print("  " * depth + ("" if depth == 0 else "<- ") + _lineage_label(step))
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

    _emit(data, as_json, render)
    if from_dagster and not data["agree"]:
        sys.exit(1)


@main.command("dagster-home")
def dagster_home() -> None:
    """Print the embedded Dagster instance's folder (DAGSTER_HOME for `dagster dev`)."""
    from esper_assets.defs import embedded_dagster_home

    click.echo(embedded_dagster_home())


# -- assets ------------------------------------------------------------------------------
@main.group()
def assets() -> None:
    """Search and manage blueprints, kernels and checkpoints in the asset repository."""


def _repository():
    from esper_assets.storage import AssetRepository

    return AssetRepository.from_env()


def _assets_table(rows: list, title: str) -> Table:
    table = Table(title=title)
    for column in ("asset_id", "type", "name", "version", "state", "size", "tags", "created"):
        table.add_column(column)
    for m in rows:
        cells = (
            m.asset_id, m.asset_type, m.name, f"{m.version} (#{m.version_number})", m.state,
            str(m.size_bytes), ",".join(sorted(m.tags)), m.created_at.isoformat(timespec="seconds"),
        )  # fmt: skip
        table.add_row(*map(escape, cells))  # names and tags are data, not rich markup
    return table


@assets.command("search")
@click.option(
    "--type", "asset_types", multiple=True, help="blueprint, kernel or checkpoint (repeatable)."
)
@click.option("--tag", "tags", multiple=True, help="Tag the asset must have (repeatable).")
@click.option("--any-tag", is_flag=True, help="Match any of the tags instead of all.")
@click.option(
    "--property",
    "properties",
    help='JSON object the properties must contain, e.g. \'{"target": "cpu"}\'.',
)
@click.option("--name", help="Exact name.")
@click.option("--state", help="active, deprecated or archived.")
@click.option("--text", help="Case-insensitive text in the name or properties.")
@click.option("--parent", help="Parent asset id.")
@click.option("--order-by", default="created_at", show_default=True)
@click.option("--desc", is_flag=True, help="Descending order.")
@click.option("--limit", default=50, show_default=True, type=int)
@click.option("--offset", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def assets_search(
    asset_types,
    tags,
    any_tag,
    properties,
    name,
    state,
    text,
    parent,
    order_by,
    desc,
    limit,
    offset,
    as_json,
) -> None:
    """Find assets; every filter is optional and they combine with AND."""
    from esper_assets.storage import AssetQuery

    query = AssetQuery().order_by(order_by, ascending=not desc).limit(limit).offset(offset)
    if asset_types:
        query = query.with_type(*asset_types)
    if tags:
        query = query.with_tags(tags, match="any" if any_tag else "all")
    if properties:
        query = query.with_properties_json(properties)  # bad or too deep JSON: InvalidQuery
    for method, value in (
        ("with_name", name),
        ("with_state", state),
        ("text", text),
        ("with_parent", parent),
    ):
        if value:
            query = getattr(query, method)(value)
    with _repository() as repo:
        found = repo.search_assets(query)
    _emit(
        [m.as_dict() for m in found],
        as_json,
        lambda _: console.print(_assets_table(found, f"{len(found)} asset(s)")),
    )


@assets.command("show")
@click.argument("asset_id")
@click.option("--json", "as_json", is_flag=True)
def assets_show(asset_id: str, as_json: bool) -> None:
    """One asset's metadata and audit trail."""
    with _repository() as repo:
        meta = repo.get_metadata(asset_id)
        audit = repo.get_audit_log(asset_id)
    data = {"asset": meta.as_dict(), "audit": audit}

    def render(_: Any) -> None:
        table = Table(title=f"asset {asset_id}", show_header=False)
        for key, value in data["asset"].items():
            shown = json.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
            table.add_row(key, escape(shown))
        console.print(table)
        for event in audit:
            line = f"  {event['at']:%Y-%m-%d %H:%M:%S} {event['event']} by {event['actor']}"
            console.print(escape(f"{line} {event['details']}"))

    _emit(data, as_json, render)


@assets.command("lineage")
@click.argument("asset_id")
@click.option("--depth", default=5, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def assets_lineage(asset_id: str, depth: int, as_json: bool) -> None:
    """Ancestors (nearest first) and descendants of an asset."""
    with _repository() as repo:
        lineage = repo.get_lineage(asset_id, depth)
    data = {
        key: (
            value.as_dict()
            if hasattr(value, "as_dict")
            else [v.as_dict() for v in value]
            if isinstance(value, list)
            else value
        )
        for key, value in lineage.items()
    }

    def render(_: Any) -> None:
        def label(m) -> str:
            return escape(f"{m.asset_type} {m.name} {m.version} [{m.asset_id}]")

        console.print(label(lineage["asset"]))
        for level, ancestor in enumerate(lineage["ancestors"], 1):
            console.print(f"{'  ' * level}<- {label(ancestor)}")
        for descendant in lineage["descendants"]:
            console.print(f"  -> {label(descendant)}")

    _emit(data, as_json, render)


@assets.command("deprecate")
@click.argument("asset_id")
@click.option("--reason", required=True, help="Why; recorded in the audit trail.")
def assets_deprecate(asset_id: str, reason: str) -> None:
    """Mark an asset deprecated."""
    with _repository() as repo:
        repo.deprecate_asset(asset_id, reason, actor=os.environ.get("USER", "esper"))
    console.print(f"deprecated {asset_id}: {reason}")


@assets.command("analytics")
@click.option("--json", "as_json", is_flag=True)
def assets_analytics(as_json: bool) -> None:
    """Totals by type and state, hot assets, storage size."""
    with _repository() as repo:
        report = repo.get_usage_analytics()
    _emit(report, as_json, lambda r: console.print_json(json.dumps(r)))


# -- bench -------------------------------------------------------------------------------
@main.group()
def bench() -> None:
    """Benchmarks against the raw clients, printed as tables and written as JSON."""


@bench.command("cache")
@click.option("--quick", is_flag=True, help="Fewer rounds (for smoke runs).")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="JSON file (default bench-results/cache-<backend>.json).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def bench_cache(quick: bool, out: Path | None, as_json: bool) -> None:
    """L1/L2/L3 hit latency vs raw clients, hot-id throughput, Zipf hit ratio."""
    from esper_assets.bench import cache as cache_bench

    settings = Settings.from_env()
    with _status("benchmarking the kernel cache", as_json) as status:
        result = cache_bench.run(settings, quick=quick, progress=_progress(status))
    out = out or Path("bench-results") / f"cache-{result['backend']}.json"
    _report_bench(result, out, as_json, _render_cache_bench)


@bench.command("repository")
@click.option("--quick", is_flag=True, help="10,000 assets instead of 100,000.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench-results/repository.json"),
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def bench_repository(quick: bool, out: Path, as_json: bool) -> None:
    """bulk_create vs raw COPY, create/search/lineage latency (PostgreSQL if configured, and SQLite)."""
    from esper_assets.bench import repository as repository_bench

    settings = Settings.from_env()
    with _status("benchmarking the asset repository", as_json) as status:
        result = repository_bench.run(settings, quick=quick, progress=_progress(status))
    _report_bench(result, out, as_json, _render_repository_bench)


@bench.command("pipeline")
@click.option(
    "--quick", is_flag=True, help="100 blueprints and 1,000 files instead of 1,000 and 10,000."
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("bench-results/pipeline.json"),
    show_default=True,
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def bench_pipeline(quick: bool, out: Path, as_json: bool) -> None:
    """End-to-end backfill on the embedded default, and sensor tick cost."""
    from esper_assets.bench import pipeline as pipeline_bench

    with _status("benchmarking the pipeline", as_json) as status:
        result = pipeline_bench.run(quick=quick, progress=_progress(status))
    _report_bench(result, out, as_json, _render_pipeline_bench)


def _progress(status) -> Callable[[str], None]:
    """Progress messages into the spinner (no spinner under --json)."""
    return (lambda msg: status.update(msg)) if status is not None else (lambda msg: None)


def _report_bench(
    result: dict[str, Any], out: Path, as_json: bool, render: Callable[[Any], None]
) -> None:
    """Write the benchmark's JSON to ``out`` and print it (tables, or JSON)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _emit(result, as_json, render)
    if not as_json:
        console.print(f"JSON written to {out}")


def _render_pipeline_bench(result: dict[str, Any]) -> None:
    for section in ("backfill", "sensor"):
        table = Table(title=f"esper bench pipeline - {section}")
        table.add_column("measurement")
        table.add_column("value", justify="right")
        for key, value in result[section].items():
            table.add_row(key, escape(str(value)))
        console.print(table)


def _render_repository_bench(result: dict[str, Any]) -> None:
    for r in result["results"]:
        table = Table(title=f"esper bench repository - {r['backend']}, {r['assets']} assets")
        table.add_column("measurement")
        table.add_column("value", justify="right")
        table.add_row("bulk_create assets/s", f"{r['bulk_create_per_s']:,}")
        table.add_row(f"raw {r['raw_client']} rows/s", f"{r['raw_bulk_per_s']:,}")
        table.add_row("ratio (raw table with the same foreign keys)", str(r["bulk_ratio"]))
        table.add_row(
            "raw rows/s without foreign keys", f"{r['raw_bulk_without_foreign_keys_per_s']:,}"
        )
        table.add_row("ratio without foreign keys", str(r["bulk_ratio_without_foreign_keys"]))
        table.add_row("create_asset p50 ms", str(r["create_p50_ms"]))
        for name, ms in r["search_p50_ms"].items():
            table.add_row(f"search p50 ms: {name}", str(ms))
        table.add_row("get_lineage(depth=5) p50 ms", str(r["lineage_depth5_p50_ms"]))
        console.print(table)
        for target, met in r["targets"].items():
            console.print(f"  {target}: {'[green]met[/]' if met else '[red]NOT met[/]'}")
    for note in result["notes"]:
        console.print(note)


def _render_cache_bench(result: dict[str, Any]) -> None:
    table = Table(
        title=f"esper bench cache - {result['backend']} ({result['machine']['cpus']} CPUs)"
    )
    for column in ("measurement", "esper us", "raw us", "raw client", "ratio", "target", "met"):
        table.add_column(column)
    for c in result["comparisons"]:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[c["ok"]]
        table.add_row(
            c["name"],
            str(c["ours_us"]),
            str(c["raw_us"]),
            c["raw_label"],
            str(c["ratio"]),
            c["target"],
            met + (f" {c['note']}" if c["note"] else ""),
        )
    console.print(table)
    hot = result["hot_gets"]
    console.print(
        f"1000 gets over 100 hot ids: 4 threads {hot['threads_4_ms']} ms, get_many {hot['get_many_10x100_ms']} ms "
        f"(target <= 20 ms: {'met' if hot['ok'] else 'NOT met'}); cold get_many {hot['cold_get_many_10x100_ms']} ms"
        + (
            f" vs raw MGET {hot['raw_redis_mget_10x100_ms']} ms"
            if "raw_redis_mget_10x100_ms" in hot
            else ""
        )
        + f"; hit rate {hot['hit_rate_hot']}"
    )
    z = result["zipf"]
    console.print(
        f"Zipf(1.0), {z['ids']} ids, {z['requests']} requests, L1 = 1% of ids: TinyLFU {z['tinylfu_hit_ratio']} vs "
        f"LRU {z['lru_hit_ratio']} (cachetools LRU {z['cachetools_lru_hit_ratio']}): +{z['gain_points']} points "
        f"(target >= 8: {'met' if z['ok'] else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
