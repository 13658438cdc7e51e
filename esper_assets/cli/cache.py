"""``esper cache ...``: the kernel cache the ``ESPER_*`` variables configure."""

from __future__ import annotations

import os
import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from esper_assets.cli.render import console, emit, self_check, stats_table
from esper_assets.settings import Settings


def open_cache(settings: Settings | None = None):
    """The kernel cache ``settings`` (default: the environment's) configure, built
    by the wiring (a context manager). Imported when used: ``esper --help`` stays fast."""
    from esper_assets.flows import wiring

    return wiring.open_cache(settings or Settings.from_env())


@click.group()
def cache() -> None:
    """Inspect and maintain the kernel cache configured by ESPER_* variables."""


@cache.command("demo")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def cache_demo(as_json: bool) -> None:
    """Put kernels, read them back through the tiers, and show the stats."""
    settings = Settings.from_env()
    with open_cache(settings) as kernels:
        steps, stats, health = _walk_the_tiers(kernels)
    result = {"settings": settings.describe(), "steps": steps, "stats": stats, "health": health}
    emit(result, as_json, _render_cache_demo)


def _walk_the_tiers(kernels) -> tuple[list[dict[str, Any]], dict, dict]:
    """Put small kernels and a large one, lose L1, read them back: what served each."""
    small = {f"demo-kernel-{i}": os.urandom(64 * 1024) for i in range(8)}
    large_id, large = "demo-kernel-large", os.urandom(3 << 20)
    steps: list[dict[str, Any]] = [
        {"step": "put", "id": kernel_id, "bytes": len(value),
         "tiers": kernels.put(kernel_id, value)}
        for kernel_id, value in [*small.items(), (large_id, large)]
    ]  # fmt: skip
    first = next(iter(small))
    self_check(kernels.get(first) == small[first], "L1 hit returned the wrong bytes")
    steps.append({"step": "get", "id": first, "served_by": "l1"})
    kernels.clear_l1()  # forget L1, as a fresh training process would start
    report = kernels.warm_cache([first, large_id, "demo-kernel-missing"])
    for kernel_id, tier in report.items():
        steps.append({"step": "get after L1 loss", "id": kernel_id, "served_by": tier})
    self_check(kernels.get(large_id) == large, "large object came back different")
    steps.append({"step": "get", "id": large_id, "served_by": "l1 (promoted)"})
    return steps, kernels.get_stats(include_sizes=True), kernels.health()


def _render_cache_demo(data: dict[str, Any]) -> None:
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
    console.print(stats_table(data["stats"]))
    console.print("health: " + ", ".join(f"{k}={v['status']}" for k, v in data["health"].items()))


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True)
def cache_stats(as_json: bool) -> None:
    """Entries and bytes per tier, breaker states."""
    with open_cache() as c:
        stats = c.get_stats(include_sizes=True)
    emit(stats, as_json, lambda s: console.print(stats_table(s)))


@cache.command("health")
@click.option("--json", "as_json", is_flag=True)
def cache_health(as_json: bool) -> None:
    """Ping every tier."""
    with open_cache() as c:
        health = c.health()
    emit(health, as_json, lambda h: [console.print(f"{k}: {v}") for k, v in h.items()])
    if any(v["status"] != "healthy" for v in health.values()):
        sys.exit(1)


@cache.command("cleanup")
@click.option("--json", "as_json", is_flag=True)
def cache_cleanup(as_json: bool) -> None:
    """Remove expired entries from every tier."""
    with open_cache() as c:
        removed = c.cleanup()
    emit(removed, as_json, lambda r: console.print(f"removed expired entries: {r}"))


@cache.command("warm")
@click.option("--top", default=100, show_default=True, help="How many of the most used kernels.")
@click.option("--json", "as_json", is_flag=True)
def cache_warm(top: int, as_json: bool) -> None:
    """Load the most used kernels (by recorded access counts) into the fast tiers."""
    from rich.progress import track

    report: dict[str, str] = {}
    with open_cache() as c:
        ids = c.hottest(top)
        batches = [ids[i : i + 50] for i in range(0, len(ids), 50)]
        for batch in track(
            batches, description="warming", console=Console(stderr=True), disable=as_json
        ):
            report.update(c.warm_cache(batch))
    loaded = sum(1 for tier in report.values() if tier != "missing")
    emit(report, as_json, lambda r: console.print(f"warmed {loaded} of {len(r)} kernel(s): {r}"))
