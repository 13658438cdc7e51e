"""``esper analytics query|shell``: SQL (DuckDB, read only) over the usage files, the
repository's assets and checkpoints, and the daily rollups, in the object store and
database the ``ESPER_*`` variables configure.

A bad query exits 1 with DuckDB's one-line message (the query, not the setup, was
wrong); other EsperErrors exit 2 like every command. Damaged usage files are skipped
and named on stderr.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from esper_assets.cli.render import console
from esper_assets.errors import InvalidQuery
from esper_assets.settings import Settings

FORMATS = ("table", "csv", "json", "parquet")
PROMPT = "esper> "
CONTINUE_PROMPT = "  ...> "
SHELL_HELP = (
    "One SELECT at a time, over as many lines as you like: end it with ; or an empty "
    "line. .tables lists the views; .quit (or EOF) ends."
)


def _warn(message: str) -> None:
    Console(stderr=True).print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


@contextmanager
def open_session() -> Iterator:
    """An AnalyticsSession over the settings' object store and repository. Imported
    when used: ``esper --help`` stays fast (no DuckDB, no storage)."""
    from esper_assets.analytics.query import AnalyticsSession
    from esper_assets.flows import wiring

    settings = Settings.from_env()
    store = wiring.object_store(settings)
    with wiring.open_repository(settings, store) as repo, AnalyticsSession(store, repo) as session:
        yield session


def _warn_skipped(session, already: int = 0) -> int:
    """Warn of the damaged files the session met (after the first ``already``); how
    many it has met. Views load when a query first names them, so this follows each."""
    for key, reason in session.skipped[already:]:
        _warn(f"skipped {key}: {reason}")
    return len(session.skipped)


@click.group()
def analytics() -> None:
    """Ask the usage files, assets and daily rollups with SQL (read only)."""


def _cell(value: object) -> str:
    """A value as text: lists and maps as JSON, None as empty."""
    if value is None:
        return ""
    if isinstance(value, list | dict):
        return json.dumps(value, default=_json_value)
    return str(value)


def rich_table(table) -> Table:
    drawn = Table(caption=f"{table.num_rows} row(s)")
    for name in table.column_names:
        drawn.add_column(escape(name))
    for row in table.to_pylist():
        drawn.add_row(*(escape(_cell(v)) for v in row.values()))
    return drawn


def csv_text(table) -> str:
    # Python's csv rather than pyarrow's: pyarrow cannot write list columns (tags).
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.column_names)
    writer.writerows([_cell(v) for v in row.values()] for row in table.to_pylist())
    return out.getvalue()


def _json_value(value: object) -> object:
    # DuckDB's sum() of integers is a HUGEINT, a Decimal here: a JSON number, not text.
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return str(value)


def json_text(table) -> str:
    return json.dumps(table.to_pylist(), indent=2, default=_json_value) + "\n"


def drawn_text(table) -> str:
    """What the console would draw, as text (a table written to a file)."""
    capture = Console(width=160, file=io.StringIO())
    capture.print(rich_table(table))
    return capture.file.getvalue()


TEXT_FORMATS = {"csv": csv_text, "json": json_text, "table": drawn_text}


def _write(table, fmt: str, out: Path | None) -> None:
    """``table`` in ``fmt`` to ``out``, or to stdout (parquet needs ``out``)."""
    if fmt == "table" and out is None:
        console.print(rich_table(table))
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, out, compression="zstd")
    else:
        text = TEXT_FORMATS[fmt](table)
        if out is None:
            click.echo(text, nl=False)
            return
        out.write_text(text)
    console.print(f"{table.num_rows} row(s) written to {escape(str(out))}")


def _bad_query(exc: InvalidQuery) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    sys.exit(1)


@analytics.command("query")
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
def query(sql: str, fmt: str, out: Path | None) -> None:
    """Run one SELECT over the views events, assets, checkpoints, kernel_usage_daily."""
    if fmt == "parquet" and out is None:
        raise click.UsageError("--format parquet writes a file: give --out FILE")
    with open_session() as session:
        try:
            result = session.query(sql)
        except InvalidQuery as exc:
            _bad_query(exc)
        _warn_skipped(session)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    _write(result, fmt, out)


def _dot_command(session, command: str) -> bool:
    """Do one ``.command``; False when it asks to end."""
    if command in (".quit", ".exit"):
        return False
    if command == ".tables":
        click.echo("\n".join(session.views()))
    elif command == ".help":
        click.echo(SHELL_HELP)
    else:
        click.echo(f"unknown command {command!r}; {SHELL_HELP}", err=True)
    return True


def _run_in_shell(session, sql: str) -> None:
    try:
        console.print(rich_table(session.query(sql)))
    except InvalidQuery as exc:  # the shell goes on: the next statement may be right
        click.echo(f"error: {exc}", err=True)


@analytics.command("shell")
def shell() -> None:
    """A small SQL prompt over the same views as ``query``."""
    with open_session() as session:
        click.echo(SHELL_HELP)
        lines: list[str] = []  # the statement typed so far
        warned = 0
        while True:
            click.echo(CONTINUE_PROMPT if lines else PROMPT, nl=False)
            line = sys.stdin.readline()
            text = line.strip()
            if not lines and text.startswith("."):
                if not _dot_command(session, text):
                    break
                continue
            if text:
                lines.append(line.rstrip("\n"))
            # A statement ends with ";", an empty line or the end of input.
            if lines and (not line or not text or text.endswith(";")):
                _run_in_shell(session, "\n".join(lines))
                lines = []
                warned = _warn_skipped(session, warned)
            if not line:
                break
        click.echo()
