"""Dagster code location ``esper_assets``: ``dg dev`` / ``dg check defs`` (pyproject's
``[tool.dg.project]``), ``dagster dev -w workspace.yaml`` and ``dagster definitions
validate`` (``[tool.dagster]``) load this module and call ``esper_definitions``.

The asset graph is blueprints -> compiled_kernels, partitioned by blueprint name;
the new_blueprints sensor feeds it from the landing zone, and three schedules keep
the cache clean and warm and re-validate every blueprint nightly.

Importing this module reads no environment: the resources (and the ``ESPER_*``
settings behind them) are built when Dagster calls ``esper_definitions``, or when a
caller calls ``build_definitions``, so a bad variable is reported by the load, naming
the variable, and tests can set the environment first and build afterwards.
"""

import dagster as dg

from esper_assets.defs._compat import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
)
from esper_assets.defs.assets import blueprint_partitions, blueprints, compiled_kernels
from esper_assets.defs.instance import embedded_dagster_home, local_instance
from esper_assets.defs.maintenance import (
    cache_maintenance_job,
    revalidate_blueprints_job,
    schedules,
    warm_kernel_cache_job,
)
from esper_assets.defs.resources import resources_from_env
from esper_assets.defs.sensors import (
    FILE_TAG,
    evaluate_new_blueprints,
    ingest_blueprints_job,
    new_blueprints,
)

# The package's public face: the runner, the CLI and the bench import these names
# from ``esper_assets.defs`` and never reach into its modules.
__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "FILE_TAG",
    "RUN_KEY_TAG",
    "SENSOR_NAME_TAG",
    "blueprint_partitions",
    "build_definitions",
    "embedded_dagster_home",
    "esper_definitions",
    "evaluate_new_blueprints",
    "ingest_blueprints_job",
    "local_instance",
    "new_blueprints",
]


def build_definitions(**resource_overrides: dg.ConfigurableResource) -> dg.Definitions:
    """Definitions bound to the current environment, with any resource replaced by name
    (tests build several; e.g. ``blueprint_rules=BlueprintRulesResource(max_layers=2)``)."""
    return dg.Definitions(
        assets=[blueprints, compiled_kernels],
        jobs=[
            ingest_blueprints_job,
            cache_maintenance_job,
            warm_kernel_cache_job,
            revalidate_blueprints_job,
        ],
        schedules=schedules,
        sensors=[new_blueprints],
        resources=resources_from_env() | resource_overrides,
    )


@dg.definitions
def esper_definitions() -> dg.Definitions:
    """What Dagster loads: the module's one ``@dg.definitions`` function, called lazily."""
    return build_definitions()
