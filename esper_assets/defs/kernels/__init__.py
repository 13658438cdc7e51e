"""The kernels domain: blueprint files land, the ``new_blueprints`` sensor turns them
into partitions and runs of ``ingest_blueprints``, and the assets ``blueprints`` ->
``compiled_kernels`` (one step, ``blueprints_and_kernels``, with their checks) validate,
register, compile and cache them
(bodies in ``flows/arrivals`` and ``flows/kernels``)."""

import dagster as dg

from esper_assets.defs.kernels.assets import blueprint_partitions, blueprints_and_kernels
from esper_assets.defs.kernels.sensors import (
    FILE_TAG,
    ingest_blueprints_job,
    new_blueprints,
)

__all__ = [
    "FILE_TAG",
    "blueprint_partitions",
    "definitions",
    "ingest_blueprints_job",
    "new_blueprints",
]

# Resources are bound once, for every domain, in ``esper_assets.defs.build_definitions``.
definitions = dg.Definitions(
    assets=[blueprints_and_kernels],
    jobs=[ingest_blueprints_job],
    sensors=[new_blueprints],
)
