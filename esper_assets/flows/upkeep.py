"""Keeping the cache and the repository healthy, without Dagster: the bodies of the
scheduled jobs in ``defs/upkeep`` (hourly cleanup, warming every 15 minutes,
nightly re-validation), callable from anywhere that holds a cache or a repository.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from esper_assets.analytics.rollups import latest_warm_list
from esper_assets.blueprints import BlueprintInvalid, BlueprintLimits
from esper_assets.errors import EsperError
from esper_assets.flows.kernels import find_kernel, load_registered_blueprint, registered_blueprints
from esper_assets.storage import AssetRepository, PersistentKernelCache
from esper_assets.storage.objects import ObjectStore

__all__ = [
    "Cleanup",
    "Revalidation",
    "clean_cache",
    "outcome_counts",
    "revalidate",
    "revalidate_blueprints",
    "warm_most_used",
]


@dataclass(frozen=True)
class Cleanup:
    """What one cleanup did: expired entries removed per tier (-1: tier unreachable),
    write-back keys flushed, and the entries each tier holds afterwards."""

    removed: dict[str, int]
    flushed: int
    entries: dict[str, int | None]


def clean_cache(cache: PersistentKernelCache) -> Cleanup:
    """Drop expired entries from every tier, then flush the write-back queue."""
    removed = cache.cleanup()
    flushed = cache.flush()
    stats = cache.get_stats(include_sizes=True)
    entries = {tier: s.get("entries") for tier, s in stats["tiers"].items()}
    return Cleanup(removed, flushed, entries)


def warm_most_used(
    cache: PersistentKernelCache,
    repo: AssetRepository,
    n: int = 100,
    store: ObjectStore | None = None,
) -> dict[str, str]:
    """Load the ``n`` most-used kernels into the fast tiers; a kernel every cache tier has
    lost is put back from the repository. Returns per kernel id where it came from.

    Most used means the newest ``cache_warm_list`` in ``store`` (decayed use over 30
    days, every process's) when there is one, else this cache's own access counts."""
    found = latest_warm_list(store, n) if store is not None else None
    report = cache.warm_cache(found[1] if found else cache.hottest(n))
    for kernel_id, outcome in report.items():
        if outcome == "missing" and (asset_id := find_kernel(repo, kernel_id)) is not None:
            # Upkeep, not use: counting it would keep the kernels it warms looking hot.
            cache.put(kernel_id, repo.get_asset(asset_id, record_access=False)[1])
            report[kernel_id] = "repository"
    return report


def outcome_counts(report: dict[str, str]) -> dict[str, int]:
    """How many kernels :func:`warm_most_used` found where (e.g. ``{"l3": 4, "repository": 1}``)."""
    return dict(Counter(report.values()))


@dataclass(frozen=True)
class Revalidation:
    """What one re-validation looked at: every registered blueprint version, by
    name@version, and those that no longer pass, with why."""

    checked: list[str]
    failed: dict[str, str]


def revalidate(repo: AssetRepository, limits: BlueprintLimits | None = None) -> Revalidation:
    """Parse every registered blueprint again under ``limits`` and check that its parent
    is not archived."""
    checked: list[str] = []
    failed: dict[str, str] = {}
    for meta in registered_blueprints(repo):
        ref = f"{meta.name}@{meta.version}"
        checked.append(ref)
        try:
            load_registered_blueprint(repo, meta.asset_id, limits)
            if meta.parent_id and repo.get_metadata(meta.parent_id).state == "archived":
                failed[ref] = "its parent blueprint is archived"
        except BlueprintInvalid as exc:
            failed[ref] = "; ".join(str(p) for p in exc.problems)
        except EsperError as exc:
            failed[ref] = str(exc)
    return Revalidation(checked, failed)


def revalidate_blueprints(
    repo: AssetRepository, limits: BlueprintLimits | None = None
) -> dict[str, str]:
    """Parse every registered blueprint again under ``limits``; return what fails, by name@version."""
    return revalidate(repo, limits).failed
