"""Retention of checkpoints (which to keep, archive or delete) and garbage collection
of the chunks no live checkpoint references.

A checkpoint is kept when any rule of the policy keeps it; a run's newest step is
always kept. What falls out is archived (repository state ``archived``: still listed
and restorable; its chunks stay live, and those no other checkpoint that is not
archived uses are moved under the object store's ``archive/`` prefix, where reads
still find them) or deleted. The repository has no way to remove
an asset, so a deleted checkpoint is a tombstone: deprecated with the reason, then
expired (``expires_at`` = now), which hides it from every search and refuses reads
of its manifest; its chunks are no longer live and ``collect_garbage`` frees them.
Manifests are self-contained (every file lists all its chunks), so deleting a middle
step never breaks a later one. Each decision is written to the asset's audit log by
the repository's own lifecycle methods, with its reason.

May import: ``esper_assets.errors``, ``settings``, ``storage`` and this package.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from esper_assets.checkpoints import manifest as mf
from esper_assets.checkpoints.store import CHECKPOINT, CheckpointStore
from esper_assets.errors import AssetNotFound, InvalidInput
from esper_assets.settings import Settings
from esper_assets.storage.chunks.gc import check_grace
from esper_assets.storage.repository import AssetMetadata, AssetQuery

ACTIONS = ("archive", "delete")
ACTOR = "esper retention"


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int | None = 5  # the newest N steps of each run
    keep_every: int | None = None  # steps divisible by N
    keep_newer_than: timedelta | None = timedelta(days=7)
    keep_best: int | None = None  # best K by ``metric`` (the manifest's metrics)
    metric: str | None = None
    higher_is_better: bool = False
    action: str = "archive"  # what falls out: "archive" or "delete"

    def __post_init__(self) -> None:
        for name, low in (("keep_last", 0), ("keep_every", 1), ("keep_best", 0)):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < low
            ):
                raise InvalidInput(f"{name} must be an integer >= {low} or None, not {value!r}")
        if self.keep_newer_than is not None and (
            not isinstance(self.keep_newer_than, timedelta) or self.keep_newer_than < timedelta(0)
        ):
            raise InvalidInput(
                f"keep_newer_than must be a non-negative timedelta, not {self.keep_newer_than!r}"
            )
        if self.keep_best and not self.metric:
            raise InvalidInput("keep_best needs a metric: name the manifest metric to rank by")
        if self.action not in ACTIONS:
            raise InvalidInput(f"action must be one of {list(ACTIONS)}, not {self.action!r}")

    @classmethod
    def from_settings(cls, settings: Settings | None) -> RetentionPolicy:
        """The policy the ESPER_CHECKPOINT_* variables set (keep last 5, newer than 7
        days, archive, unless they say otherwise); None: the defaults."""
        if settings is None:
            return cls()
        days = settings.checkpoint_keep_days
        return cls(
            keep_last=settings.checkpoint_keep_last,
            keep_every=settings.checkpoint_keep_every,
            keep_newer_than=None if days is None else timedelta(days=days),
            action=settings.checkpoint_retention_action,
        )

    def describe(self) -> str:
        rules = {k: v for k, v in asdict(self).items() if v not in (None, False)}
        return ", ".join(f"{k}={v}" for k, v in rules.items())


@dataclass
class RetentionReport:
    kept: list[str] = field(default_factory=list)
    archived: list[str] = field(default_factory=list)  # archived by this call
    deleted: list[str] = field(default_factory=list)  # deleted by this call
    reasons: dict[str, str] = field(default_factory=dict)  # asset id -> why
    dry_run: bool = False
    chunks_archived: int = 0  # moved under archive/: only archived checkpoints use them
    bytes_archived: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GcReport:
    chunks_deleted: int
    bytes_freed: int
    chunks_kept: int
    chunks_in_grace: int = 0  # unreferenced but touched within the grace period
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- retention ---------------------------------------------------------------------------
def apply_retention(
    store: CheckpointStore,
    policy: RetentionPolicy,
    run_id: str | None = None,
    now: datetime | None = None,
    dry_run: bool = False,
) -> RetentionReport:
    """Keep, archive or delete the checkpoints (of ``run_id``) as ``policy`` says.
    ``now`` (default: the clock) is what ``keep_newer_than`` counts back from."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise InvalidInput(f"now must be timezone-aware (e.g. datetime.now(UTC)), not {now}")
    report = RetentionReport(dry_run=dry_run)
    for metas in _by_run(store, run_id).values():
        keeps = _keep_reasons(metas, policy, now)
        for meta in metas:
            if meta.asset_id in keeps:
                report.kept.append(meta.asset_id)
                report.reasons[meta.asset_id] = "kept: " + "; ".join(keeps[meta.asset_id])
            else:
                _drop(store, meta, policy, report, f"no rule keeps it ({policy.describe()})")
    if report.archived and not dry_run:
        report.chunks_archived, report.bytes_archived = _archive_chunks(store, report.archived)
    return report


def _archive_chunks(store: CheckpointStore, archived: list[str]) -> tuple[int, int]:
    """Move under ``archive/`` the chunks of the newly archived checkpoints that no
    other live, not archived checkpoint uses (those stay where saves and restores
    of active runs read them first)."""
    wanted: set[str] = set()
    for asset_id in archived:
        wanted |= _chunks_of(store, asset_id)
    for meta in store.repo.search_assets(AssetQuery().with_type(CHECKPOINT)):
        if meta.state != "archived" and wanted:
            wanted -= _chunks_of(store, meta.asset_id)
    return store.chunks.archive(wanted)


def _by_run(store: CheckpointStore, run_id: str | None) -> dict[str, list[AssetMetadata]]:
    query = AssetQuery().with_type(CHECKPOINT)  # deleted (expired) ones are not found
    if run_id is not None:
        query = query.with_name(mf.check_name("run id", run_id))
    runs: dict[str, list[AssetMetadata]] = {}
    for meta in store.repo.search_assets(query):
        runs.setdefault(meta.name, []).append(meta)
    for metas in runs.values():
        metas.sort(key=_step)
    return runs


def _step(meta: AssetMetadata) -> int:
    return meta.properties.get("step", -1)


def _keep_reasons(
    metas: list[AssetMetadata], policy: RetentionPolicy, now: datetime
) -> dict[str, list[str]]:
    """{asset id: the rules that keep it} for one run's checkpoints, sorted by step."""
    keeps: dict[str, list[str]] = {}

    def keep(chosen, why: str) -> None:
        for meta in chosen:
            keeps.setdefault(meta.asset_id, []).append(why)

    keep(metas[-1:], "the run's newest step")
    if policy.keep_last:
        keep(metas[-policy.keep_last :], f"one of the last {policy.keep_last} steps")
    if policy.keep_every:
        keep([m for m in metas if _step(m) % policy.keep_every == 0],
             f"step divisible by {policy.keep_every}")  # fmt: skip
    if policy.keep_newer_than is not None:
        cutoff = now - policy.keep_newer_than
        keep([m for m in metas if m.created_at and m.created_at > cutoff],
             f"newer than {policy.keep_newer_than}")  # fmt: skip
    if policy.keep_best:
        keep(_best(metas, policy), f"best {policy.keep_best} by {policy.metric}")
    return keeps


def _best(metas: list[AssetMetadata], policy: RetentionPolicy) -> list[AssetMetadata]:
    """The ``keep_best`` checkpoints with the best numeric ``metric`` (those without
    it cannot rank); ties go to the later step."""
    scored = []
    for meta in metas:
        value = (meta.properties.get("metrics") or {}).get(policy.metric)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            scored.append((value if policy.higher_is_better else -value, _step(meta), meta))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [meta for _, _, meta in scored[: policy.keep_best]]


def _drop(
    store: CheckpointStore,
    meta: AssetMetadata,
    policy: RetentionPolicy,
    report: RetentionReport,
    why: str,
) -> None:
    if policy.action == "archive":
        if meta.state == "archived":
            report.reasons[meta.asset_id] = f"already archived; {why}"
            return
        report.archived.append(meta.asset_id)
        report.reasons[meta.asset_id] = f"archived: {why}"
        if not report.dry_run:
            archive_checkpoint(store, meta.asset_id, why)
    else:
        report.deleted.append(meta.asset_id)
        report.reasons[meta.asset_id] = f"deleted: {why}"
        if not report.dry_run:
            delete_checkpoint(store, meta.asset_id, why)


def archive_checkpoint(store: CheckpointStore, asset_id: str, reason: str) -> None:
    """State ``archived``, the reason in its properties (so the audit row carries it).
    The manifest stays where it is and its chunks stay live: still restorable."""
    meta = store.repo.get_metadata(asset_id)
    properties = {**meta.properties, "retention": {"action": "archived", "reason": reason}}
    store.repo.update_asset(asset_id, {"state": "archived", "properties": properties}, actor=ACTOR)


def delete_checkpoint(store: CheckpointStore, asset_id: str, reason: str) -> None:
    """Deprecate (audit: the reason), then expire now (audit: updated): from then on no
    search finds it, its manifest cannot be read and its chunks are not live. In that
    order, so an interruption leaves it deprecated but whole, never half gone."""
    store.repo.deprecate_asset(asset_id, f"deleted by retention: {reason}", actor=ACTOR)
    store.repo.update_asset(asset_id, {"expires_at": datetime.now(UTC)}, actor=ACTOR)


# -- garbage collection ------------------------------------------------------------------
def live_chunks(store: CheckpointStore) -> set[str]:
    """Every chunk address a checkpoint that is not deleted references (archived and
    deprecated ones too). A manifest that cannot be read stops the collection."""
    live: set[str] = set()
    for meta in store.repo.search_assets(AssetQuery().with_type(CHECKPOINT)):
        live |= _chunks_of(store, meta.asset_id)
    return live


def _chunks_of(store: CheckpointStore, asset_id: str) -> set[str]:
    """The chunk addresses a checkpoint's manifest names (none once it is deleted).
    Not an access: retention and gc read manifests for bookkeeping only, and counting
    that as use would keep every checkpoint looking hot to warming and analytics."""
    try:
        _, data = store.repo.get_asset(asset_id, record_access=False)
    except AssetNotFound:  # deleted (expired) meanwhile
        return set()
    manifest = mf.decode(data, f"checkpoint {asset_id}")
    return {a for c in manifest["components"].values() for f in c["files"] for a, _ in f["chunks"]}


def grace_from_settings(settings: Settings | None) -> timedelta:
    """ESPER_CHECKPOINT_GC_GRACE_HOURS (default 1 hour)."""
    return timedelta(hours=settings.checkpoint_gc_grace_hours if settings else 1.0)


def collect_garbage(
    store: CheckpointStore, grace: timedelta = timedelta(hours=1), dry_run: bool = False
) -> GcReport:
    """Delete the chunks no live manifest references and no save touched within
    ``grace`` (which must exceed the longest save: its chunks are touched first)."""
    check_grace(grace)
    result = store.chunks.collect_garbage(live_chunks(store), grace, dry_run)
    return GcReport(len(result.deleted), result.bytes_freed, result.kept, result.in_grace,
                    dry_run)  # fmt: skip
