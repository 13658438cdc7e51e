"""``esper assets ...``: search and manage the asset repository the ``ESPER_*``
variables configure."""

from __future__ import annotations

import json
import os
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from esper_assets.cli.render import console, emit
from esper_assets.settings import Settings


def open_repository(settings: Settings | None = None):
    """The asset repository ``settings`` (default: the environment's) configure, built
    by the wiring (a context manager). Imported when used: ``esper --help`` stays fast."""
    from esper_assets.flows import wiring

    return wiring.open_repository(settings or Settings.from_env())


@click.group()
def assets() -> None:
    """Search and manage blueprints, kernels and checkpoints in the asset repository."""


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
    asset_types, tags, any_tag, properties, name, state, text, parent, order_by, desc, limit,
    offset, as_json,
) -> None:  # fmt: skip
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
    with open_repository() as repo:
        found = repo.search_assets(query)
    emit(
        [m.as_dict() for m in found],
        as_json,
        lambda _: console.print(_assets_table(found, f"{len(found)} asset(s)")),
    )


@assets.command("show")
@click.argument("asset_id")
@click.option("--json", "as_json", is_flag=True)
def assets_show(asset_id: str, as_json: bool) -> None:
    """One asset's metadata and audit trail."""
    with open_repository() as repo:
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

    emit(data, as_json, render)


@assets.command("lineage")
@click.argument("asset_id")
@click.option("--depth", default=5, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def assets_lineage(asset_id: str, depth: int, as_json: bool) -> None:
    """Ancestors (nearest first) and descendants of an asset."""
    with open_repository() as repo:
        lineage = repo.get_lineage(asset_id, depth)
    data = {key: _as_data(value) for key, value in lineage.items()}

    def render(_: Any) -> None:
        def label(m) -> str:
            return escape(f"{m.asset_type} {m.name} {m.version} [{m.asset_id}]")

        console.print(label(lineage["asset"]))
        for level, ancestor in enumerate(lineage["ancestors"], 1):
            console.print(f"{'  ' * level}<- {label(ancestor)}")
        for descendant in lineage["descendants"]:
            console.print(f"  -> {label(descendant)}")

    emit(data, as_json, render)


def _as_data(value: Any) -> Any:
    """An asset (or a list of them) as plain data for JSON; anything else unchanged."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, list):
        return [v.as_dict() for v in value]
    return value


@assets.command("deprecate")
@click.argument("asset_id")
@click.option("--reason", required=True, help="Why; recorded in the audit trail.")
def assets_deprecate(asset_id: str, reason: str) -> None:
    """Mark an asset deprecated."""
    with open_repository() as repo:
        repo.deprecate_asset(asset_id, reason, actor=os.environ.get("USER", "esper"))
    console.print(f"deprecated {asset_id}: {reason}")


@assets.command("analytics")
@click.option("--json", "as_json", is_flag=True)
def assets_analytics(as_json: bool) -> None:
    """Totals by type and state, hot assets, storage size."""
    with open_repository() as repo:
        report = repo.get_usage_analytics()
    emit(report, as_json, lambda r: console.print_json(json.dumps(r)))
