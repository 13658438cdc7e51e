"""``esper ingest`` and ``make demo`` (``esper demo``) as functions returning their
report: both tick the new_blueprints sensor and run what it asks for (``driver``),
then the new_checkpoints sensor (``runner.checkpoints``: what landed under
``checkpoints/`` and what training saved, each reported to Dagster and verified).
The demo first lands the example blueprints, then reads back the kernels, the
cache's stats and one kernel's lineage from both the repository and Dagster, and
saves a checkpoint before ticking new_checkpoints, which it reads back from the
event log at the saved step; it ends with an analytics query over the usage files
its cache and repository wrote."""

from __future__ import annotations

from dataclasses import asdict
from tempfile import TemporaryDirectory

import dagster as dg
import numpy as np

from esper_assets.analytics.query import AnalyticsSession
from esper_assets.blueprints import example_blueprint_files
from esper_assets.defs import build_definitions, local_instance
from esper_assets.flows.kernels import describe, lineage_chain, registered_kernels
from esper_assets.flows.landing import LandingZone
from esper_assets.flows.wiring import (
    landing_zone,
    object_store,
    open_cache,
    open_checkpoints,
    open_repository,
)
from esper_assets.runner.checkpoints import dagster_checkpoint, tick_checkpoints
from esper_assets.runner.driver import tick_and_run
from esper_assets.runner.lineage import dagster_lineage
from esper_assets.settings import Settings


def land_examples(landing: LandingZone) -> list[str]:
    """Put the example blueprints in the landing zone (unchanged files are left alone)."""
    landed = []
    present = {f.key for f in landing.list_blueprints()}
    for path in example_blueprint_files():
        data = path.read_bytes()
        if path.name not in present or landing.read(path.name) != data:
            landing.put(path.name, data)
            landed.append(path.name)
    return landed


def run_ingest(settings: Settings | None = None) -> dict:
    """``esper ingest``: tick the new_blueprints sensor on ``ESPER_LANDING`` and run what
    it asks for, until nothing new is left (one outcome per file); then tick
    new_checkpoints, which ingests ``ESPER_LANDING/checkpoints/`` and reports every
    checkpoint saved since its last tick (training's too), each with its verify run."""
    settings = settings or Settings.from_env()
    landing = landing_zone(settings)  # a landing zone we refuse stops here
    defs = build_definitions(settings)
    with local_instance(settings) as instance:
        report = tick_and_run(defs, instance)
        checkpoints = tick_checkpoints(defs, instance)
        files = report.files()
        return {
            "landing": landing.location,
            "dagster_home": instance.root_directory,
            "ticks": report.ticks,
            "files": [asdict(f) for f in files],
            "failed": sum(not f.ok for f in files),
            "checkpoints": checkpoints.as_dict(),
        }


def run_demo(settings: Settings | None = None) -> dict:
    """The README's main command: land the examples, let the sensor and runs do their
    work, and report what happened, the cache's stats and one kernel's lineage."""
    settings = settings or Settings.from_env()
    landed = land_examples(landing_zone(settings))
    defs, instance = build_definitions(settings), local_instance(settings)
    report = tick_and_run(defs, instance)
    with open_repository(settings) as repo:
        kernels = registered_kernels(repo)
        chains = [lineage_chain(repo, m.name) for m in kernels]
        longest = max(chains, key=len, default=[])
        chain = [describe(m) for m in longest]
    with open_cache(settings) as cache:
        fetched = sum(cache.get(m.properties["kernel_id"]) is not None for m in kernels)
        stats = cache.get_stats(include_sizes=True)
    return {
        "settings": settings.describe(),
        "dagster_home": instance.root_directory,
        "landed": landed,
        "ticks": report.ticks,
        "runs": [vars(r) for r in report.runs],
        "files": [asdict(f) for f in report.files()],
        "kernels_registered": len(kernels),
        "kernels_fetched_from_cache": fetched,
        "lineage": chain,
        "dagster_lineage": dagster_lineage(instance, longest[0].name) if longest else [],
        "stats": stats,
        "checkpoint": checkpoint_in_dagster(
            defs, instance, checkpoint_round_trip(settings, [m.asset_id for m in kernels])
        ),
        "usage": usage_query(settings),
    }


# What the demo asks last, as `esper analytics query` would: the usage its cache and
# repository just recorded (every demo run so far, as the files accumulate).
USAGE_SQL = """SELECT source, tier, count(DISTINCT id) AS ids,
       sum(requests)::BIGINT AS requests, sum(bytes)::BIGINT AS bytes
FROM events GROUP BY source, tier ORDER BY source, tier"""


def usage_query(settings: Settings) -> dict:
    """Run :data:`USAGE_SQL` over the usage files (flushed when the demo's cache and
    repository closed): the rows, and the damaged files skipped."""
    if not settings.usage:
        return {"sql": USAGE_SQL, "rows": [], "skipped": [], "off": True}
    with AnalyticsSession(object_store(settings)) as session:
        rows = session.query(USAGE_SQL).to_pylist()
        return {"sql": USAGE_SQL, "rows": rows, "skipped": session.skipped, "off": False}


DEMO_RUN = "demo"


def checkpoint_in_dagster(defs: dg.Definitions, instance: dg.DagsterInstance, saved: dict) -> dict:
    """Tick new_checkpoints so Dagster records the checkpoint just saved (and runs its
    restorable check), then read it back from the event log: ``saved`` plus what
    Dagster holds for that step (``dagster``, None if nothing) and whether it agrees."""
    ticked = tick_checkpoints(defs, instance)
    recorded = dagster_checkpoint(instance, saved["run"], saved["asset_id"])
    return {
        **saved,
        "reported_to_dagster": len(ticked.reported),
        "restorable_checks": ticked.checks,
        "dagster": recorded,
        "dagster_agrees": recorded is not None and recorded.get("step") == saved["step"],
    }


def checkpoint_round_trip(settings: Settings, kernel_ids: list[str]) -> dict:
    """Save the next step of the ``demo`` run (a small model whose second layer stays
    as it was, and the kernels the run uses), restore it into a temporary folder and
    compare: the checkpoint part of ``make demo``."""
    with open_checkpoints(settings) as store:
        step = store.next_step(DEMO_RUN)
        rng = np.random.default_rng(step)  # layer 0 changes each step, layer 1 never
        model = {
            "layer0.weight": rng.standard_normal((256, 256), dtype=np.float32),
            "layer1.weight": np.random.default_rng(-1 % 2**32).standard_normal(
                (256, 256), np.float32
            ),
        }
        info = store.save(DEMO_RUN, step, {"model": model}, kernels=kernel_ids)
        with TemporaryDirectory() as folder:
            report = store.restore(DEMO_RUN, step, dest=folder)
            restored = store.load_tensors(DEMO_RUN, step, component="model")
        same = all(np.array_equal(restored[name], model[name]) for name in model)
    return {
        "run": DEMO_RUN,
        "step": step,
        "asset_id": info.asset_id,
        "logical_bytes": info.logical_bytes,
        "stored_bytes": info.stored_bytes,
        "kernels": len(info.kernels),
        "parent_id": info.parent_id,
        "restored_files": len(report.files),
        "restored_equal": same,
    }
