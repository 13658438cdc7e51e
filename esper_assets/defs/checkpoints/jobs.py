"""The checkpoint jobs and their schedules (STOPPED by default, like upkeep's): daily
retention + chunk garbage collection, and the platform's own state saved as the
run ``platform`` every 30 minutes. Thin shells around ``flows/checkpoints``."""

from datetime import timedelta

import dagster as dg

from esper_assets.checkpoints.retention import RetentionPolicy
from esper_assets.defs.resources import CheckpointsResource, KernelCacheResource
from esper_assets.errors import InvalidInput
from esper_assets.flows import checkpoints as flow

# The config fields that change the policy (flow.policy_with's keywords).
RULES = ("keep_last", "keep_every", "keep_newer_than_days", "keep_best", "metric",
         "higher_is_better", "action")  # fmt: skip


class RetentionConfig(dg.Config):
    """One run's retention: the checkpoints resource's policy and grace (filled from
    ``ESPER_CHECKPOINT_*``) with the values given here instead; ``from_settings: false``
    starts from no rule at all (a run's newest step is always kept)."""

    dry_run: bool = False
    # None: the resource's (ESPER_CHECKPOINT_GC_GRACE_HOURS); must exceed the longest
    # save, whose chunks are touched again just before its manifest is registered
    grace_hours: float | None = None
    from_settings: bool = True
    keep_last: int | None = None  # each run's newest N steps (0: none by this rule)
    keep_every: int | None = None  # steps divisible by N (N >= 1)
    keep_newer_than_days: float | None = None  # 0: none by this rule
    keep_best: int | None = None  # the best K by ``metric``
    metric: str | None = None  # a manifest metric; lower is better unless higher_is_better
    higher_is_better: bool = False
    action: str | None = None  # what falls out: archive | delete

    def policy(self, configured: RetentionPolicy) -> RetentionPolicy:
        base = configured if self.from_settings else flow.NO_RULES
        rules = self.model_dump(include=set(RULES))
        return flow.policy_with(base, **rules)

    def grace(self, configured: timedelta) -> timedelta:
        if self.grace_hours is None:
            return configured
        if not self.grace_hours >= 0:  # NaN too
            raise InvalidInput(
                f"grace_hours must be a number of hours >= 0, not {self.grace_hours}"
            )
        return timedelta(hours=self.grace_hours)


def _checked(
    config: RetentionConfig, checkpoints: CheckpointsResource
) -> tuple[RetentionPolicy, timedelta]:
    """The run's policy and grace, or InvalidInput saying which field is wrong (of the
    resource, then of the run config); before anything is changed."""
    configured, grace = checkpoints.retention_policy(), checkpoints.gc_grace()
    try:
        return config.policy(configured), config.grace(grace)
    except InvalidInput as exc:
        raise InvalidInput(
            f"checkpoint_retention_job: op config apply_checkpoint_retention: {exc}; "
            "fix it in the run config (nothing was changed)"
        ) from None


@dg.op(description="Keep, archive or delete checkpoints by the retention policy, then "
       "delete the chunks no live checkpoint references (after a grace period).")  # fmt: skip
def apply_checkpoint_retention(
    context: dg.OpExecutionContext, config: RetentionConfig, checkpoints: CheckpointsResource
) -> dict:
    policy, grace = _checked(config, checkpoints)
    with checkpoints.open() as store:
        done = flow.retain(store, policy, grace, config.dry_run)
    retention, gc = done["retention"], done["gc"]
    context.log.info(
        f"{policy.describe()}: kept {len(retention['kept'])}, archived "
        f"{len(retention['archived'])}, deleted {len(retention['deleted'])}; "
        f"{gc['chunks_deleted']} chunks ({gc['bytes_freed']} bytes) freed"
    )
    context.add_output_metadata({
        "policy": dg.MetadataValue.text(done["policy"]),
        "kept": len(retention["kept"]),
        "archived": dg.MetadataValue.text(", ".join(retention["archived"])),
        "deleted": dg.MetadataValue.text(", ".join(retention["deleted"])),
        "chunks_deleted": gc["chunks_deleted"],
        "bytes_freed": gc["bytes_freed"],
        "chunks_in_grace": gc["chunks_in_grace"],
        "grace_hours": grace.total_seconds() / 3600,
        "dry_run": config.dry_run,
    })  # fmt: skip
    return done


@dg.job(description="Checkpoint retention (keep/archive/delete) and chunk garbage collection.")
def checkpoint_retention_job() -> None:
    apply_checkpoint_retention()


@dg.op(description="Save the platform's state (repository counts, cache stats, hottest "
       "kernels, sensor cursors) as the next step of the checkpoint run 'platform'.")  # fmt: skip
def save_platform_state(
    context: dg.OpExecutionContext,
    checkpoints: CheckpointsResource,
    kernel_cache: KernelCacheResource,
) -> str:
    with checkpoints.open() as store, kernel_cache.open() as cache:
        components = flow.platform_state(store, cache, _sensor_cursors(context.instance))
        info = flow.save_platform_state(store, components)
    context.log.info(f"saved {info.asset_id} ({info.logical_bytes} bytes)")
    context.add_output_metadata({
        "repository_id": dg.MetadataValue.text(info.asset_id),
        "step": info.step,
        "logical_bytes": info.logical_bytes,
        "new_bytes_stored": info.stored_bytes,
    })  # fmt: skip
    return info.asset_id


def _sensor_cursors(instance: dg.DagsterInstance) -> dict[str, str | None]:
    """Each sensor's stored cursor, by name (schedules have none)."""
    cursors = {}
    for state in instance.all_instigator_state():
        cursor = getattr(state.instigator_data, "cursor", None)
        if cursor is not None or state.instigator_type.value == "SENSOR":
            cursors[state.name] = cursor
    return cursors


@dg.job(description="Checkpoint the platform's own state (restorable with esper checkpoints).")
def platform_state_job() -> None:
    save_platform_state()


schedules = [
    dg.ScheduleDefinition(
        name="daily_checkpoint_retention", job=checkpoint_retention_job,
        cron_schedule="45 3 * * *",
        description="Every day at 03:45: apply checkpoint retention, then collect garbage.",
    ),
    dg.ScheduleDefinition(
        name="platform_state_every_30_minutes", job=platform_state_job,
        cron_schedule="*/30 * * * *",
        description="Every 30 minutes: checkpoint the platform's state as the run 'platform'.",
    ),
]  # fmt: skip
