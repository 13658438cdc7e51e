"""The checkpoints domain: the ``checkpoints`` asset (one partition per training run),
its ``checkpoint_restorable`` check (run by ``verify_checkpoints``) and the
``new_checkpoints`` sensor that reports saves made outside Dagster; the daily
retention job and the platform-state job with their schedules (logic in
``flows/checkpoints``)."""

import dagster as dg

from esper_assets.defs.checkpoints.assets import (
    checkpoint_restorable,
    checkpoint_runs,
    checkpoints,
    verify_checkpoints_job,
)
from esper_assets.defs.checkpoints.jobs import (
    checkpoint_retention_job,
    platform_state_job,
    schedules,
)
from esper_assets.defs.checkpoints.sensors import new_checkpoints

__all__ = ["checkpoint_runs", "definitions", "new_checkpoints", "verify_checkpoints_job"]

# Resources are bound once, for every domain, in ``esper_assets.defs.build_definitions``.
definitions = dg.Definitions(
    assets=[checkpoints],
    asset_checks=[checkpoint_restorable],
    jobs=[verify_checkpoints_job, checkpoint_retention_job, platform_state_job],
    schedules=schedules,
    sensors=[new_checkpoints],
)
