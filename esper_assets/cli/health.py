"""``esper health``: every cache tier's status and latency, with a probe that writes a
value through the cache, reads each tier that took it back, and deletes it again."""

from __future__ import annotations

import os
import sys
import time
import uuid
from typing import Any

import click
from rich.table import Table

from esper_assets.cli.render import console, emit
from esper_assets.errors import EsperError
from esper_assets.settings import Settings

PROBE_BYTES = 1024


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1e3, 2)


def probe(cache) -> dict[str, dict[str, Any]]:
    """``cache.health()`` (ping, breaker) plus, per tier, a write-read-delete of one
    small value: put through the cache, read back from each tier that took it (the
    frame's checksum verified), invalidated, and read again to see it gone."""
    from esper_assets.storage.cache import framing

    report = cache.health()
    kernel_id, data = f"health-probe-{uuid.uuid4().hex}", os.urandom(PROBE_BYTES)
    start = time.perf_counter()
    try:
        took = set(cache.put(kernel_id, data))
    except EsperError as exc:  # a durable tier refused it: every tier's probe failed
        took, put_error = set(), f"{type(exc).__name__}: {exc}"
    else:
        put_error = None
    put_ms = _ms(start)
    for level, tier in report.items():
        tier["probe"] = probe_of = {"write_ms": put_ms, "written": level in took}
        if put_error:
            probe_of["error"] = put_error
        elif level != "l1" and level in took:
            start = time.perf_counter()
            try:
                blob = cache.tier(level).get(kernel_id)
                probe_of["read_ms"] = _ms(start)
                probe_of["read"] = blob is not None and (
                    not isinstance(blob, bytes | bytearray)
                    or cache.codecs.decode(framing.unpack(blob)) == data
                )
            except EsperError as exc:
                probe_of["read"], probe_of["error"] = False, f"{type(exc).__name__}: {exc}"
    start = time.perf_counter()
    try:
        cache.invalidate(kernel_id)
        deleted_ms, delete_error = _ms(start), None
    except EsperError as exc:
        deleted_ms, delete_error = _ms(start), f"{type(exc).__name__}: {exc}"
    for level, tier in report.items():
        p = tier["probe"]
        p["delete_ms"] = deleted_ms
        if delete_error:
            p.setdefault("error", delete_error)
        elif level != "l1" and level in took:
            try:
                p["deleted"] = cache.tier(level).get(kernel_id) is None
            except EsperError as exc:
                p["deleted"] = False
                p.setdefault("error", f"{type(exc).__name__}: {exc}")
        ok = "error" not in p and p.get("read", True) and p.get("deleted", True)
        if tier["status"] == "healthy" and not ok:
            tier["status"] = "failing"
    return report


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

    with wiring.open_cache(Settings.from_env()) as cache:
        report = probe(cache)
    emit(report, as_json, _render)
    if any(t["status"] != "healthy" for t in report.values()):
        sys.exit(1)
