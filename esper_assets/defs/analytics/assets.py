"""The daily analytics assets: one partition per UTC day, each a thin shell around one
rollup of ``esper_assets.analytics.rollups`` over the code location's object store
(and repository), reporting what it wrote as metadata and its checks as results of
the same materialization (checks on a partitioned asset run with each partition).

Checks: ``schema`` (the written file has the rollup's schema), ``non_empty`` (a day
with usage rows gives rows), ``fresh`` (every usage file of the day, as listed after
writing, was seen: one that landed during the run fails it, and re-materializing the
partition takes it in).
"""

import math
from datetime import date

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from esper_assets.analytics import rollups
from esper_assets.analytics.dataset import DamagedFile, event_keys, read_parquet_object
from esper_assets.defs.resources import AssetRepositoryResource, ObjectStoreResource
from esper_assets.storage.objects import ObjectStore

# Fixed, so the partitions never change under Dagster; earlier days can be backfilled
# by moving it back.
ANALYTICS_START = "2026-11-01"
analytics_days = dg.DailyPartitionsDefinition(start_date=ANALYTICS_START)

GROUP = "analytics"
TOP = 10  # kernels shown in a markdown table
SCHEMA, NON_EMPTY, FRESH = "schema", "non_empty", "fresh"
CHECK_DESCRIPTIONS = {
    SCHEMA: "The written Parquet file has the rollup's schema.",
    NON_EMPTY: "A day with usage rows gives a non-empty rollup.",
    FRESH: "Every usage file of the day (listed after writing) was read or skipped.",
}


def _specs(asset: str, *checks: str) -> list[dg.AssetCheckSpec]:
    return [dg.AssetCheckSpec(c, asset=asset, description=CHECK_DESCRIPTIONS[c]) for c in checks]


def _day(context: dg.AssetExecutionContext) -> date:
    return date.fromisoformat(context.partition_key)


# -- the assets ----------------------------------------------------------------------------
@dg.asset(
    partitions_def=analytics_days, group_name=GROUP, kinds={"parquet", "duckdb"},
    check_specs=_specs("usage_events_daily", SCHEMA, NON_EMPTY, FRESH),
    description="The day's usage files (usage/events/date=D/hour=*/) compacted into one "
    "zstd Parquet file sorted by (id, tier, window_start): usage/daily/events/date=D/.",
)  # fmt: skip
def usage_events_daily(
    context: dg.AssetExecutionContext, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    store = object_store.open()
    done = rollups.compact_day(store, _day(context))
    # Compaction drops nothing: every row read is in the file.
    return _result(context, store, "events", done, done.rows == done.events, {})


@dg.asset(
    partitions_def=analytics_days, group_name=GROUP, kinds={"parquet", "duckdb"},
    deps=[usage_events_daily],
    check_specs=_specs("kernel_usage_daily", SCHEMA, NON_EMPTY, FRESH),
    description="Per kernel and cache tier: requests, hit rate, bytes, p50/p95/p99 "
    "latency (us) from the summed histograms: usage/daily/kernel_usage/date=D/.",
)  # fmt: skip
def kernel_usage_daily(
    context: dg.AssetExecutionContext, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    store = object_store.open()
    done = rollups.kernel_usage_daily(store, _day(context))
    return _result(context, store, "kernel_usage", done, _rows_if_events(done),
                   _kernel_usage_metadata(done.table))  # fmt: skip


class WarmListConfig(dg.Config):
    top_n: int = 100  # kernels listed
    half_life_days: float = 7  # a day's reads count half as much this many days later
    lookback_days: int = 30  # days of usage read


@dg.asset(
    partitions_def=analytics_days, group_name=GROUP, kinds={"parquet", "duckdb"},
    deps=[kernel_usage_daily],
    check_specs=_specs("cache_warm_list", SCHEMA, NON_EMPTY, FRESH),
    description="The kernels to warm the cache with first, by exponentially decayed "
    "reads over the lookback window, summed from each day's kernel_usage_daily file: "
    "usage/daily/warm_list/date=D/.",
)  # fmt: skip
def cache_warm_list(
    context: dg.AssetExecutionContext, config: WarmListConfig, object_store: ObjectStoreResource
) -> dg.MaterializeResult:
    store = object_store.open()
    done = rollups.cache_warm_list(store, _day(context), **config.model_dump())
    columns = ("rank", "kernel_id", "score", "requests", "last_used")
    return _result(context, store, "warm_list", done, _rows_if_events(done),
                   {"top_kernels": _markdown(done.table, columns)})  # fmt: skip


class RetirementConfig(dg.Config):
    unused_days: int = 30  # no use in this many days (ending with the partition's day)
    apply: bool = False  # deprecate them (reason in each one's audit log); else only list


@dg.asset(
    partitions_def=analytics_days, group_name=GROUP, kinds={"parquet", "duckdb"},
    deps=[usage_events_daily],
    check_specs=_specs("retirement_candidates", SCHEMA, FRESH),
    description="Active kernels and blueprints unused for unused_days (never a kernel a "
    "live checkpoint names, nor the blueprint of a kernel that stays); deprecated only "
    "with apply: usage/daily/retirement_candidates/date=D/.",
)  # fmt: skip
def retirement_candidates(
    context: dg.AssetExecutionContext, config: RetirementConfig,
    object_store: ObjectStoreResource, repository: AssetRepositoryResource,
) -> dg.MaterializeResult:  # fmt: skip
    store = object_store.open()
    with repository.open() as repo:
        done = rollups.retirement_candidates(store, repo, _day(context), **config.model_dump())
    types = done.table.column("asset_type").to_pylist()
    columns = ("asset_id", "asset_type", "name", "version")
    return _result(context, store, "retirement_candidates", done, None, {
        "kernels": types.count("kernel"), "blueprints": types.count("blueprint"),
        "deprecated": config.apply, "candidates": _markdown(done.table, columns),
    })  # fmt: skip


@dg.asset(
    partitions_def=analytics_days, group_name=GROUP, kinds={"parquet", "duckdb"},
    check_specs=_specs("asset_inventory", SCHEMA),
    description="The repository's assets by type and state (count, bytes, expired) when "
    "the partition ran: usage/daily/inventory/date=D/.",
)  # fmt: skip
def asset_inventory(
    context: dg.AssetExecutionContext,
    object_store: ObjectStoreResource,
    repository: AssetRepositoryResource,
) -> dg.MaterializeResult:
    store = object_store.open()
    with repository.open() as repo:
        done = rollups.asset_inventory(store, repo, _day(context))
    table = done.table
    return _result(context, store, "inventory", done, None, {
        "assets": sum(table.column("assets").to_pylist()),
        "bytes": sum(table.column("bytes").to_pylist()),
        "inventory": _markdown(table, table.column_names),
    })  # fmt: skip


ASSETS = [usage_events_daily, kernel_usage_daily, cache_warm_list, retirement_candidates,
          asset_inventory]  # fmt: skip


# -- what a materialization reports ---------------------------------------------------------
def _result(
    context: dg.AssetExecutionContext, store: ObjectStore, name: str, done: rollups.Rollup,
    non_empty: bool | None, metadata: dict,
) -> dg.MaterializeResult:  # fmt: skip
    """The rollup's common metadata plus ``metadata``, and the asset's checks (``None``
    for ``non_empty``: the asset has no such check)."""
    asset = context.asset_key
    checks = [_schema_check(store, asset, name, done)]
    if non_empty is not None:
        # Only compaction must keep every row; a day of repository reads alone rightly
        # gives no kernel usage, so the others warn.
        severity = dg.AssetCheckSeverity.ERROR if name == "events" else dg.AssetCheckSeverity.WARN
        checks.append(dg.AssetCheckResult(
            check_name=NON_EMPTY, asset_key=asset, passed=non_empty, severity=severity,
            metadata={"rows": done.rows, "usage_rows": done.events},
        ))  # fmt: skip
    if name != "inventory":  # the inventory reads no usage files
        checks.append(fresh_check(store, asset, _day(context), done))
    return dg.MaterializeResult(metadata=_common(done) | metadata, check_results=checks)


def _common(done: rollups.Rollup) -> dict:
    skipped = "\n".join(f"- `{key}`: {reason}" for key, reason in done.skipped)
    return {
        "dagster/row_count": done.rows,
        "path": dg.MetadataValue.path(done.key),
        "usage_rows": done.events,
        "files": done.files,
        "bytes_in": done.bytes_in,
        "bytes_out": done.bytes_out,
        "skipped_files": len(done.skipped),
        "skipped": dg.MetadataValue.md(skipped or "none"),
    }


def _rows_if_events(done: rollups.Rollup) -> bool:
    return done.rows > 0 or done.events == 0


def _schema_check(
    store: ObjectStore, asset: dg.AssetKey, name: str, done: rollups.Rollup
) -> dg.AssetCheckResult:
    expected = rollups.OUTPUT_SCHEMAS[name]
    try:
        written = read_parquet_object(store, done.key).schema
    except DamagedFile as exc:
        return dg.AssetCheckResult(check_name=SCHEMA, asset_key=asset, passed=False,
                                   description=f"{done.key} {exc}")  # fmt: skip
    same = written.remove_metadata().equals(expected)
    return dg.AssetCheckResult(
        check_name=SCHEMA, asset_key=asset, passed=same,
        description=None if same else f"{done.key} has {written}, expected {expected}",
        metadata={"columns": len(written)},
    )  # fmt: skip


def fresh_check(
    store: ObjectStore, asset: dg.AssetKey, day: date, done: rollups.Rollup
) -> dg.AssetCheckResult:
    """Passed when the day's usage files now are the ones the rollup saw."""
    now = len(event_keys(store, day))
    late = now - done.day_files
    return dg.AssetCheckResult(
        check_name=FRESH, asset_key=asset, passed=late == 0,
        description=f"{late} usage file(s) of {day} arrived after the rollup read the day; "
        "materialize the partition again" if late else None,
        metadata={"day_files": now, "seen": done.day_files},
    )  # fmt: skip


# -- kernel usage in numbers the UI plots ---------------------------------------------------
def _kernel_usage_metadata(table: pa.Table) -> dict:
    rows = table.to_pylist()
    total = sum(r["requests"] for r in rows)
    per_tier: dict[str, int] = {}
    for r in rows:
        per_tier[r["tier"]] = per_tier.get(r["tier"], 0) + r["requests"]
    finite_p99 = [
        r["p99_us"] for r in rows if r["p99_us"] is not None and math.isfinite(r["p99_us"])
    ]
    return {
        "kernels": len({r["kernel_id"] for r in rows}),
        "requests": total,
        "bytes": sum(r["bytes"] for r in rows),
        # The slowest kernel-tier's p99 (the overflow bucket, +inf, is left out)
        "p99_us_max": float(max(finite_p99, default=0.0)),
        **{f"hit_rate_{tier}": n / total for tier, n in sorted(per_tier.items())},
        "top_kernels": _markdown(_top_kernels(table), ("kernel_id", "tier", "requests",
                                                       "hit_rate", "bytes", "p99_us")),
    }  # fmt: skip


def _top_kernels(table: pa.Table) -> pa.Table:
    """The rows of the TOP kernels with the most requests (all their tiers)."""
    totals: dict[str, int] = {}
    for kernel, n in zip(table.column("kernel_id").to_pylist(),
                         table.column("requests").to_pylist(), strict=True):  # fmt: skip
        totals[kernel] = totals.get(kernel, 0) + n
    top = sorted(totals, key=lambda k: (-totals[k], k))[:TOP]
    return table.filter(pc.is_in(table.column("kernel_id"), pa.array(top, pa.string())))


def _markdown(table: pa.Table, columns) -> dg.MetadataValue:
    rows = table.select(list(columns)).slice(0, 50).to_pylist()
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines) if rows else "none")


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
