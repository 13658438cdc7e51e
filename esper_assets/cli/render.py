"""How every ``esper`` command prints: one console, JSON or tables, a spinner, and one
way to report an :class:`EsperError` (a one-line message on stderr, exit code 2)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from esper_assets.errors import EsperError

# A pipe or CI log gets a wide fixed width so tables are not squeezed to 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=160)


def fail(exc: EsperError) -> None:
    """Print ``exc`` as one error message on stderr and exit 2."""
    # Text, not markup; one line per line of the message (the terminal wraps, not rich)
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    sys.exit(2)


class EsperGroup(click.Group):
    """Turns EsperError into a one-line message instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EsperError as exc:
            fail(exc)


def status(message: str, quiet: bool) -> AbstractContextManager:
    """A spinner on the console, or nothing when the output is JSON."""
    return nullcontext() if quiet else console.status(message)


def progress(spinner) -> Callable[[str], None]:
    """Progress messages into the spinner (no spinner under --json)."""
    return (lambda msg: spinner.update(msg)) if spinner is not None else (lambda msg: None)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """``data`` as a JSON document on stdout, or drawn by ``render``."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        render(data)


def write_and_emit(
    result: dict[str, Any], out: Path, as_json: bool, render: Callable[[Any], None]
) -> None:
    """Write ``result`` as JSON to ``out``, then print it (tables, or JSON)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    emit(result, as_json, render)
    if not as_json:
        console.print(f"JSON written to {out}")


def self_check(condition: bool, message: str) -> None:
    """A demo's own check: an EsperError (exit 2) when what it showed is wrong."""
    if not condition:
        raise EsperError(f"demo self-check failed: {message}")


def measurements_table(title: str, rows: dict[str, Any]) -> Table:
    """Two columns, measurement and value, one row per item of ``rows``."""
    table = Table(title=title)
    table.add_column("measurement")
    table.add_column("value", justify="right")
    for key, value in rows.items():
        table.add_row(key, escape(str(value)))
    return table


_STATS_COLUMNS = ("tier", "hits", "misses", "errors", "corruptions", "skipped",
                  "p50 us", "p99 us", "breaker", "entries", "bytes")  # fmt: skip
_COUNTERS = ("hits", "misses", "errors", "corruptions", "skipped", "p50_us", "p99_us")


def stats_table(stats: dict[str, Any]) -> Table:
    """The kernel cache's ``get_stats()``: one row per tier, totals in the caption."""
    table = Table(title="kernel cache")
    for column in _STATS_COLUMNS:
        table.add_column(column, justify="left" if column in ("tier", "breaker") else "right")
    for name, t in stats["tiers"].items():
        table.add_row(
            name,
            *(str(t.get(k, "")) for k in _COUNTERS),
            str(t.get("breaker", "-")),
            str(t.get("entries", "")),
            str(t.get("bytes", t.get("stored_bytes", ""))),
        )
    table.caption = (
        f"requests {stats['requests']}, hit rate {stats['overall_hit_rate']}, "
        f"lower-tier loads {stats['loads']}, write mode {stats['write_mode']}"
    )
    return table
