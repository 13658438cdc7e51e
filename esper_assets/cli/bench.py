"""``esper bench cache|repository|pipeline|checkpoints|analytics|serve``: run a benchmark of :mod:`esper_assets.bench`
on the configured settings, write its JSON and print it as tables (or JSON)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import click
from rich.table import Table

from esper_assets.cli.render import console, measurements_table, progress, status, write_and_emit
from esper_assets.settings import Settings


@click.group()
def bench() -> None:
    """Benchmarks against the raw clients, printed as tables and written as JSON."""


def _per_backend_options(name: str, quick: str):
    """``--quick``, ``--out`` (default: bench-results/<name>-<backend>.json) and ``--json``."""

    def add(command):
        for option in reversed([
            click.option("--quick", is_flag=True, help=quick),
            click.option("--out", type=click.Path(path_type=Path), default=None,
                         help=f"JSON file (default bench-results/{name}-<backend>.json)."),
            click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables."),
        ]):  # fmt: skip
            command = option(command)
        return command

    return add


def _run_bench(what: str, name: str, run, out: Path | None, as_json: bool, render) -> None:
    """``run(progress=...)`` under a spinner; its JSON written to ``out`` (by default
    bench-results/<name>-<backend>.json, the backend it ran on) and printed."""
    with status(f"benchmarking {what}", as_json) as spinner:
        result = run(progress=progress(spinner))
    out = out or Path("bench-results") / f"{name}-{result['backend']}.json"
    write_and_emit(result, out, as_json, render)


@bench.command("cache")
@_per_backend_options("cache", quick="Fewer rounds (for smoke runs).")
def bench_cache(quick: bool, out: Path | None, as_json: bool) -> None:
    """L1/L2/L3 hit latency vs raw clients, hot-id throughput, Zipf hit ratio."""
    from esper_assets.bench import cache as cache_bench

    settings = Settings.from_env()
    run = partial(cache_bench.run, settings, quick=quick)
    _run_bench("the kernel cache", "cache", run, out, as_json, _render_cache_bench)


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
    with status("benchmarking the asset repository", as_json) as spinner:
        result = repository_bench.run(settings, quick=quick, progress=progress(spinner))
    write_and_emit(result, out, as_json, _render_repository_bench)


@bench.command("pipeline")
@click.option(
    "--quick", is_flag=True, help="100 blueprints and 1,000 files instead of 1,000 and 10,000."
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("bench-results/pipeline.json"),
    show_default=True,
)  # fmt: skip
@click.option(
    "--instance", "instance_kind", type=click.Choice(["embedded", "postgres", "both"]),
    default="embedded", show_default=True,
    help="The Dagster instance of the backfill: embedded (SQLite), postgres (deploy/dagster.yaml "
    "on a throwaway database), or both side by side.",
)  # fmt: skip
@click.option(
    "--postgres-url", envvar="ESPER_DATABASE_URL", show_envvar=True,
    help="PostgreSQL server for --instance postgres (a throwaway database is made there).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def bench_pipeline(
    quick: bool, out: Path, instance_kind: str, postgres_url: str | None, as_json: bool
) -> None:
    """End-to-end backfill on a Dagster instance, and sensor tick cost."""
    from esper_assets.bench import pipeline as pipeline_bench

    kinds = ("embedded", "postgres") if instance_kind == "both" else (instance_kind,)
    with status("benchmarking the pipeline", as_json) as spinner:
        result = pipeline_bench.run(quick, progress(spinner), kinds, postgres_url)
    write_and_emit(result, out, as_json, _render_pipeline_bench)


@bench.command("checkpoints")
@_per_backend_options("checkpoints", quick="A 256 MB model instead of 1 GB.")
def bench_checkpoints(quick: bool, out: Path | None, as_json: bool) -> None:
    """Checkpoint save/restore vs a raw file copy: dedup, MB/s, peak RSS, save_async cost."""
    from esper_assets.bench import checkpoints as checkpoints_bench

    run = partial(checkpoints_bench.run, quick=quick)
    _run_bench("checkpoints", "checkpoints", run, out, as_json, _render_checkpoints_bench)


_CHECKPOINT_COLUMNS = (
    ("stored", "stored_fraction"), ("save MB/s", "save_mb_s"), ("copy MB/s", "raw_copy_mb_s"),
    ("+fsync MB/s", "raw_copy_fsync_mb_s"), ("save /copy", "save_vs_raw"),
    ("save /+fsync", "save_vs_durable_copy"), ("restore MB/s", "restore_mb_s"),
    ("restore /copy", "restore_vs_raw"), ("restore /+fsync", "restore_vs_durable_copy"),
    ("s/GB", "restore_s_per_gb"), ("save /boto3", "save_vs_raw_s3"),
    ("restore /boto3", "restore_vs_raw_s3"), ("save RSS MB", "save_peak_rss_mb"),
    ("restore RSS MB", "restore_peak_rss_mb"),
)  # fmt: skip


def _render_checkpoints_bench(result: dict[str, Any]) -> None:
    model = result["model"]
    table = Table(
        title=f"esper bench checkpoints - {result['backend']}, "
        f"{model['bytes'] >> 20} MB in {model['tensors']} tensors "
        f"({result['machine']['cpus']} CPUs)"
    )
    first = next(iter(result["scenarios"].values()))
    columns = [(label, key) for label, key in _CHECKPOINT_COLUMNS if key in first]  # S3 or not
    table.add_column("scenario")
    for label, _ in columns:
        table.add_column(label, justify="right")
    table.add_column("targets NOT met")
    for name, r in result["scenarios"].items():
        missed = [short for short, t in r["targets"].items() if not t["met"]]
        targets = f"[red]{', '.join(missed)}[/]" if missed else "[green]all met[/]"
        row = [f"{r[key]:.2%}" if key == "stored_fraction" else str(r[key])
               for _, key in columns]  # fmt: skip
        table.add_row(name, *row, targets)
    console.print(table)
    a = result["save_async"]
    console.print(
        f"save_async: loop {a['loop_ms_per_iter_alone']} ms/iter alone, "
        f"{a['loop_ms_per_iter_with_save']} with a save in flight ({a['save_in_flight_s']} s; "
        f"returned in {a['save_async_returned_ms']} ms): overhead {a['overhead_pct']} % "
        f"(median of rounds {a['rounds_overhead_pct']}) "
        f"(target {a['target']}: {'[green]met[/]' if a['ok'] else '[red]NOT met[/]'}); "
        f"training lost {a['training_lost_s']} s in all, {a['lost_per_30_min_pct']} % "
        "of a 30-minute interval"
    )
    console.print(f"raw baseline: {result['raw_baseline']}")
    defined = {short: t["target"] for r in result["scenarios"].values()
               for short, t in r["targets"].items() if short != "stored"}  # fmt: skip
    console.print("targets: " + "; ".join(f"{k} {v}" for k, v in defined.items())
                  + "; stored: frozen_80 <= 25 %, lora_1 <= 3 %, unchanged <= 0.5 %")  # fmt: skip


def _render_pipeline_bench(result: dict[str, Any]) -> None:
    backfill = result["backfill"]
    shared = {k: v for k, v in backfill.items() if not isinstance(v, dict)}
    console.print(measurements_table("esper bench pipeline - backfill", shared))
    for kind in ("embedded", "postgres"):
        if kind in backfill:
            title = f"esper bench pipeline - backfill on the {kind} instance"
            console.print(measurements_table(title, backfill[kind]))
    console.print(measurements_table("esper bench pipeline - sensor", result["sensor"]))


def _render_repository_bench(result: dict[str, Any]) -> None:
    for r in result["results"]:
        title = f"esper bench repository - {r['backend']}, {r['assets']} assets"
        console.print(measurements_table(title, _repository_rows(r)))
        for target, met in r["targets"].items():
            console.print(f"  {target}: {'[green]met[/]' if met else '[red]NOT met[/]'}")
    for note in result["notes"]:
        console.print(note)


def _repository_rows(r: dict[str, Any]) -> dict[str, Any]:
    """One backend's figures, labelled as the table shows them."""
    return {
        "bulk_create assets/s": f"{r['bulk_create_per_s']:,}",
        f"raw {r['raw_client']} rows/s": f"{r['raw_bulk_per_s']:,}",
        "ratio (raw table with the same foreign keys)": r["bulk_ratio"],
        "raw rows/s without foreign keys": f"{r['raw_bulk_without_foreign_keys_per_s']:,}",
        "ratio without foreign keys": r["bulk_ratio_without_foreign_keys"],
        "create_asset p50 ms": r["create_p50_ms"],
        **{f"search p50 ms: {name}": ms for name, ms in r["search_p50_ms"].items()},
        "get_lineage(depth=5) p50 ms": r["lineage_depth5_p50_ms"],
    }


def _render_cache_bench(result: dict[str, Any]) -> None:
    cpus = result["machine"]["cpus"]
    console.print(_comparisons_table(result["comparisons"], result["backend"], cpus))
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


def _comparisons_table(comparisons: list[dict[str, Any]], backend: str, cpus: int) -> Table:
    """One row per tier measured: ours against the raw client, the target, met or not."""
    table = Table(title=f"esper bench cache - {backend} ({cpus} CPUs)")
    for column in ("measurement", "esper us", "raw us", "raw client", "ratio", "target", "met"):
        table.add_column(column)
    for c in comparisons:
        met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[c["ok"]]
        table.add_row(
            c["name"], str(c["ours_us"]), str(c["raw_us"]), c["raw_label"], str(c["ratio"]),
            c["target"], met + (f" {c['note']}" if c["note"] else ""),
        )  # fmt: skip
    return table


@bench.command("analytics")
@click.option("--quick", is_flag=True, help="1 million usage rows instead of 10 million.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench-results/analytics.json"),
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def bench_analytics(quick: bool, out: Path, as_json: bool) -> None:
    """Usage rollups over synthetic events vs DuckDB reading the same Parquet raw."""
    from esper_assets.bench import analytics as analytics_bench

    with status("benchmarking the usage analytics", as_json) as spinner:
        result = analytics_bench.run(quick=quick, progress=progress(spinner))
    write_and_emit(result, out, as_json, _render_analytics_bench)


def _render_analytics_bench(result: dict[str, Any]) -> None:
    def verdict(part: dict[str, Any]) -> str:
        return "[green]met[/]" if part["ok"] else "[red]NOT met[/]"

    rollup, top, compaction = result["rollup"], result["top_100_30_days"], result["compaction"]
    console.print(f"esper bench analytics: {result['rows']:,} usage rows "
                  f"({result['parquet_mb']} MB of Parquet) on the measured day")  # fmt: skip
    l1 = result["l1_hit_recording"]
    console.print(f"L1 hit: {l1['recorded_us']} us with usage recorded, {l1['unrecorded_us']} us "
                  f"without: {l1['overhead_us']:+} us, target {l1['target']}: {verdict(l1)}")  # fmt: skip
    console.print(f"compaction: {compaction['seconds']} s, {compaction['mb_s']} MB/s")
    console.print(f"daily rollup: {rollup['seconds']} s (raw DuckDB sums: "
                  f"{rollup['raw_duckdb_seconds']} s, {rollup['vs_raw']}x), target "
                  f"{rollup['target']}: {verdict(rollup)}")  # fmt: skip
    console.print(f"top 100 kernels over 30 days: {top['ms']} ms, target {top['target']}: "
                  f"{verdict(top)}")  # fmt: skip
    console.print(f"retirement candidates over 30 days: "
                  f"{result['retirement_30_days']['seconds']} s")  # fmt: skip
    console.print(f"raw baseline: {result['raw_baseline']}")


@bench.command("serve")
@_per_backend_options("serve", quick="3 rounds of 1,000 requests instead of 7 of 4,000.")
def bench_serve(quick: bool, out: Path | None, as_json: bool) -> None:
    """esper serve's /binary vs a minimal ASGI app returning the same bytes from a dict."""
    from esper_assets.bench import serve as serve_bench

    settings = Settings.from_env()
    run = partial(serve_bench.run, settings, quick=quick)
    _run_bench("esper serve", "serve", run, out, as_json, _render_serve_bench)


def _render_serve_bench(result: dict[str, Any]) -> None:
    load = result["load"]
    table = Table(
        title=f"esper bench serve - /binary, {result['backend']} ({result['machine']['cpus']} CPUs; "
        f"{load['rounds']} rounds x {load['requests_per_round']} requests, "
        f"{load['connections']} connections)"
    )
    for column in ("size", "ours req/s", "ceiling req/s", "ratio", "ours p99 ms",
                   "ceiling p99 ms", "ours MB/s", "target", "met"):  # fmt: skip
        table.add_column(column)
    for size, r in result["sizes"].items():
        met = "[green]yes[/]" if r["ok"] else "[red]no[/]"
        table.add_row(
            size, str(r["ours"]["rps"]), str(r["ceiling"]["rps"]), str(r["ratio"]),
            str(r["ours"]["p99_ms"]), str(r["ceiling"]["p99_ms"]), str(r["ours"]["mb_s"]),
            r["target"], met,
        )  # fmt: skip
    console.print(table)
    console.print(f"raw baseline: {result['raw_baseline']}")
