"""``esper health``: every cache tier's status and latency, with a probe that writes a
value through the cache, reads each tier that took it back, and deletes it again (the
probe is ``flows.health``'s, the same as the ``kernel_cache_healthy`` asset check's)."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.table import Table

from esper_assets.cli.render import console, emit
from esper_assets.settings import Settings


def _render(report: dict[str, dict[str, Any]]) -> None:
    table = Table(title="cache tiers")
    for column in ("tier", "status", "ping ms", "write ms", "read ms", "delete ms", "breaker"):
        table.add_column(column)
    for level, t in report.items():
        p = t.get("probe", {})
        row = [t.get("latency_ms"), p.get("write_ms"), p.get("read_ms"), p.get("delete_ms")]
        table.add_row(level, t["status"], *("" if v is None else str(v) for v in row),
                      t.get("breaker", ""))  # fmt: skip
    console.print(table)
    for level, t in report.items():
        if "error" in t or "error" in t.get("probe", {}):
            console.print(f"{level}: {t.get('error') or t['probe']['error']}")


@click.command("health")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def health(as_json: bool) -> None:
    """Each cache tier's status and latency: a ping, then a probe value written, read
    back from every tier and deleted. Exit 1 if any tier is not healthy."""
    from esper_assets.flows import wiring
    from esper_assets.flows.health import probe_cache

    with wiring.open_cache(Settings.from_env()) as cache:
        report = probe_cache(cache)
    emit(report, as_json, _render)
    if any(t["status"] != "healthy" for t in report.values()):
        sys.exit(1)
