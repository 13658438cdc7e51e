"""Dagster code location ``esper_assets``: Dagster only, one folder per domain.

``dg dev`` / ``dg check defs`` (pyproject's ``[tool.dg.project]``), ``dagster dev -w
workspace.yaml`` and ``dagster definitions validate`` (``[tool.dagster]``) load this
module and call ``esper_definitions``.

What each module owns:

- ``kernels/``: the asset graph blueprints -> compiled_kernels (partitioned by
  blueprint name) with its checks, the ``new_blueprints`` sensor that feeds it from
  the landing zone, and the ``ingest_blueprints`` job.
- ``checkpoints/``: the ``checkpoints`` asset (one partition per training run), its
  ``checkpoint_restorable`` check and the ``new_checkpoints`` sensor that reports
  saves made outside Dagster and ingests the landing path.
- ``upkeep/``: the jobs and schedules that keep the cache clean and warm, and the
  nightly ``registered_blueprints_still_valid`` check on ``compiled_kernels``.
- ``resources.py``: the resources every domain shares, thin shells over
  ``esper_assets.flows.wiring``.
- ``instance.py``: the embedded Dagster instance (SQLite under ``ESPER_HOME/dagster``).
- ``_compat.py``: every use of Dagster's private modules and names, tests included.

Later domains (``analytics/``) go beside ``kernels/`` and
``upkeep/``, each with a resource-free ``definitions``, added to ``DOMAINS`` under
its name. ``build_definitions`` gives every asset its owner (``OWNERS``) and the tag
``domain: <name>`` there, once, so no domain repeats them.

May import: Dagster, ``esper_assets.flows`` (the use cases), ``settings``, ``errors``,
``blueprints``, ``storage``. Nothing imports ``defs`` but Dagster itself and, through
the names in ``__all__`` only, ``runner/``, ``cli/`` and ``bench/``.

Importing this module reads no environment: the resources (and the ``ESPER_*``
settings behind them) are built when Dagster calls ``esper_definitions``, or when a
caller calls ``build_definitions``, so a bad variable is reported by the load, naming
the variable, and tests and the bench pass their own ``Settings``.
"""

import dagster as dg

from esper_assets.defs import analytics, checkpoints, kernels, upkeep
from esper_assets.defs._compat import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
    daemon_in_process,
)
from esper_assets.defs.instance import embedded_dagster_home, local_instance
from esper_assets.defs.kernels import (
    FILE_TAG,
    blueprint_partitions,
    ingest_blueprints_job,
    new_blueprints,
)
from esper_assets.defs.resources import resources_for
from esper_assets.settings import Settings

# The package's public face: the runner, the CLI and the bench import these names
# from ``esper_assets.defs`` and never reach into its modules.
__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "FILE_TAG",
    "PARTITION_NAME_TAG",
    "RUN_KEY_TAG",
    "SENSOR_NAME_TAG",
    "blueprint_partitions",
    "build_definitions",
    "daemon_in_process",
    "embedded_dagster_home",
    "esper_definitions",
    "ingest_blueprints_job",
    "local_instance",
    "new_blueprints",
]

# One resource-free Definitions per domain, by the name its assets are tagged with;
# merged, then bound to one set of resources.
DOMAINS = {
    "kernels": kernels.definitions,
    "upkeep": upkeep.definitions,
    "checkpoints": checkpoints.definitions,
    "analytics": analytics.definitions,
}

# Who answers for every asset of the location (Dagster's owner form: team:<name> or
# an e-mail address), and the tag naming an asset's domain.
OWNERS = ("team:esper",)
DOMAIN_TAG = "domain"


def build_definitions(
    settings: Settings | None = None, **resource_overrides: dg.ConfigurableResource
) -> dg.Definitions:
    """The code location over ``settings`` (default: ``Settings.from_env()``, read now),
    with any resource replaced by name (e.g. ``blueprint_rules=BlueprintRulesResource(
    max_layers=2)``; the resources nesting a replaced ``database``, ``redis`` or
    ``object_store`` are built on the replacement)."""
    resources = resources_for(settings or Settings.from_env(), **resource_overrides)
    owned = (_owned(name, defs) for name, defs in DOMAINS.items())
    return dg.Definitions.merge(*owned, dg.Definitions(resources=resources))


def _owned(domain: str, defs: dg.Definitions) -> dg.Definitions:
    """``defs`` with every asset owned by ``OWNERS`` and tagged ``domain: <domain>``
    (``dg.map_asset_specs``; an owner or tag the asset already has is kept)."""

    def own(spec: dg.AssetSpec) -> dg.AssetSpec:
        return spec.merge_attributes(
            owners=[o for o in OWNERS if o not in spec.owners],
            tags={} if DOMAIN_TAG in spec.tags else {DOMAIN_TAG: domain},
        )

    return dg.Definitions(
        assets=dg.map_asset_specs(own, defs.assets or []),
        asset_checks=defs.asset_checks,
        jobs=defs.jobs,
        schedules=defs.schedules,
        sensors=defs.sensors,
        resources=defs.resources,
        executor=defs.executor,
        loggers=defs.loggers,
        metadata=defs.metadata,
    )


@dg.definitions
def esper_definitions() -> dg.Definitions:
    """What Dagster loads: the module's one ``@dg.definitions`` function, called lazily."""
    return build_definitions()
