"""The nightly re-validation as an asset check on ``compiled_kernels``: every kernel is
compiled from a registered blueprint version, so when today's rules (the
``blueprint_rules`` resource) refuse a registered version, or its parent has been
archived, the kernels built from it no longer meet them. The outcome shows on the
asset in Dagster (its Checks tab, its health), with what was checked and what failed.

A check on the whole asset, not per partition: it reads the repository's registered
versions, all of them at once, not one kernel partition's materialization.
"""

import dagster as dg

from esper_assets.blueprints import BlueprintLimits
from esper_assets.defs.resources import (
    AssetRepositoryResource,
    BlueprintRulesResource,
    KernelCacheResource,
)
from esper_assets.flows import health, upkeep

REVALIDATION = "registered_blueprints_still_valid"

# How many failures the check's table names; the count and the description say the rest.
LISTED = 50


@dg.asset_check(
    asset="compiled_kernels",
    name=REVALIDATION,
    description="Every active registered blueprint version (what the kernels are compiled "
    "from) still parses under today's blueprint_rules, and its parent is not archived. "
    "Runs nightly (schedule nightly_blueprint_revalidation) or by launching "
    "revalidate_blueprints_job.",
)
def registered_blueprints_still_valid(
    context: dg.AssetCheckExecutionContext,
    repository: AssetRepositoryResource,
    blueprint_rules: BlueprintRulesResource,
) -> dg.AssetCheckResult:
    limits = blueprint_rules.limits()
    with repository.open() as repo:
        found = upkeep.revalidate(repo, limits)
    for ref, why in found.failed.items():
        context.log.error(f"{ref}: {why}")
    return revalidation_result(found, limits)


def rules_text(limits: BlueprintLimits) -> str:
    """The limits a version was parsed under, as a person reads them."""
    return (
        f"file <= {limits.max_file_bytes:,} bytes, <= {limits.max_layers:,} layers, "
        f"<= {limits.max_parameters:,} parameters, every dimension <= "
        f"{limits.max_dimension:,}, <= {limits.max_activation_elements:,} activation "
        "elements per sample"
    )


def revalidation_result(found: upkeep.Revalidation, limits: BlueprintLimits) -> dg.AssetCheckResult:
    """The check's result for ``found``: passed when nothing failed; metadata naming what
    was checked (how many versions, what each went through, under which rules) and each
    failure with its reason."""
    checked, failed = len(found.checked), found.failed
    if failed:
        shown = "; ".join(f"{ref}: {why}" for ref, why in failed.items())
        description = (
            f"{len(failed)} of {checked} registered blueprint versions no longer pass: {shown}"
        )
    else:
        description = (
            f"All {checked} registered blueprint versions parse under today's rules "
            "and none has an archived parent."
        )
    metadata: dict[str, dg.MetadataValue] = {
        "blueprint_versions_checked": dg.MetadataValue.int(checked),
        "blueprint_versions_failed": dg.MetadataValue.int(len(failed)),
        "steps": dg.MetadataValue.text(
            "each active registered blueprint version: read from the repository, parsed "
            "under the rules; its parent still registered and not archived"
        ),
        "rules": dg.MetadataValue.text(rules_text(limits)),
    }
    if failed:
        metadata["failed_versions"] = dg.MetadataValue.text(", ".join(failed))
        metadata["failures"] = dg.MetadataValue.md(_failure_table(failed))
    return dg.AssetCheckResult(
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description[:4000],
        metadata=metadata,
    )


def _failure_table(failed: dict[str, str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [f"| `{ref}` | {cell(why)} |" for ref, why in list(failed.items())[:LISTED]]
    more = len(failed) - LISTED
    tail = [f"\n... and {more} more (the run's log names every one)"] if more > 0 else []
    return "\n".join(["| blueprint version | why it fails |", "|---|---|", *rows, *tail])


revalidate_blueprints_job = dg.define_asset_job(
    "revalidate_blueprints_job",
    selection=dg.AssetSelection.checks(registered_blueprints_still_valid),
    executor_def=dg.in_process_executor,  # one step: no process of its own to start
    description="Re-validate every registered blueprint (rules may have tightened): runs "
    f"the {REVALIDATION} check on compiled_kernels; its result shows on the asset.",
)


# -- the kernel cache's health, every 15 minutes -------------------------------------------
CACHE_HEALTHY = "kernel_cache_healthy"
# A kernel is still served while only these fail (L1 is per process, L2 a shared copy).
NON_DURABLE = ("l1", "l2")
HEALTH_STEPS = (
    "each tier pinged (latency, breaker state); then one 1 KiB probe value put through "
    "the cache, read back from every tier that took it (frame checksum verified), "
    "invalidated, and read again to see it gone (the same as `esper health`)"
)


@dg.asset_check(
    asset="compiled_kernels",
    name=CACHE_HEALTHY,
    description="Every tier of the kernel cache the kernels are served from answers, and a "
    "probe value written through the cache reads back from each tier and is deleted again. "
    "Runs every 15 minutes (schedule cache_health_every_15_minutes).",
)
def kernel_cache_healthy(kernel_cache: KernelCacheResource) -> dg.AssetCheckResult:
    with kernel_cache.open() as cache:
        report = health.probe_cache(cache)
    return health_result(report)


def health_result(report: dict[str, dict]) -> dg.AssetCheckResult:
    """Passed when every tier is healthy; a failure is a warning while only tiers a
    kernel can be served without are down (L1, L2), an error otherwise."""
    down = health.unhealthy(report)
    rows = [
        f"| {level} | {t['status']} | {t.get('latency_ms', '')} | "
        f"{t.get('probe', {}).get('write_ms', '')} | {t.get('probe', {}).get('read_ms', '')} | "
        f"{t.get('breaker', '')} |"
        for level, t in report.items()
    ]
    table = "\n".join(
        ["| tier | status | ping ms | write ms | read ms | breaker |", "|---|---|---|---|---|---|"]
        + rows
    )
    metadata = {
        "tiers": dg.MetadataValue.md(table),
        "steps": dg.MetadataValue.text(HEALTH_STEPS),
        "unhealthy_tiers": dg.MetadataValue.text(", ".join(down) or "none"),
    }
    durable_down = set(down) - set(NON_DURABLE)
    return dg.AssetCheckResult(
        passed=not down,
        severity=dg.AssetCheckSeverity.ERROR if durable_down else dg.AssetCheckSeverity.WARN,
        description="; ".join(f"{level}: {why}" for level, why in down.items())[:4000]
        or f"all {len(report)} tiers answered and the probe read back from each",
        metadata=metadata,
    )


cache_health_job = dg.define_asset_job(
    "cache_health_job",
    selection=dg.AssetSelection.checks(kernel_cache_healthy),
    executor_def=dg.in_process_executor,  # one step: no process of its own to start
    description=f"Probe every tier of the kernel cache: the {CACHE_HEALTHY} check on "
    "compiled_kernels; its result shows on the asset.",
)
