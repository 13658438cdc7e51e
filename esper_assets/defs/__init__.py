"""Dagster code location: ``dagster dev`` / workspace.yaml load ``defs`` from here.

The asset graph is blueprints -> compiled_kernels, partitioned by blueprint name;
the new_blueprints sensor feeds it from the landing zone, and three schedules keep
the cache clean and warm and re-validate every blueprint nightly.
"""

import dagster as dg

from esper_assets.defs.assets import blueprints, compiled_kernels
from esper_assets.defs.maintenance import (
    cache_maintenance_job,
    revalidate_blueprints_job,
    schedules,
    warm_kernel_cache_job,
)
from esper_assets.defs.resources import resources_from_env
from esper_assets.defs.sensors import ingest_blueprints_job, new_blueprints


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


defs = build_definitions()
