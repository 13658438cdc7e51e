"""What the ``new_checkpoints`` sensor does, without Dagster.

Training processes save checkpoints straight into the :class:`CheckpointStore`;
each save is a ``checkpoint`` asset in the repository. The sensor finds the ones
registered since its last look (:func:`find_new`), describes each
(:func:`describe`) and re-verifies a sample of its chunks (:func:`check_restorable`).
Other tools drop checkpoints into the landing zone instead
(:func:`ingest_landed`): ``<landing>/checkpoints/<run>/<step>/`` holding the
component files and a ``manifest.json`` written last, in a directory or under an S3
prefix (``flows.landing.checkpoint_folders``: storage only; what is ingested or
rejected, and why, is decided here, once for both). The scheduled jobs apply
retention and collect garbage (:func:`retain`) and checkpoint the platform's own
state as the run ``platform`` (:func:`save_platform_state`).

The cursor is a high-water mark: the newest ``created_at`` seen plus the ids
created within :data:`LOOKBACK` of it. Two processes' clocks and commits are not
ordered, so a save may commit a little after a later-stamped one; the window
catches it, and the cursor stays as small as the number of saves in one window.

May import: ``esper_assets.errors``, ``checkpoints``, ``storage``, ``flows.landing``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from esper_assets.checkpoints import CheckpointInfo, CheckpointStore
from esper_assets.checkpoints.manifest import check_name
from esper_assets.checkpoints.retention import RetentionPolicy, apply_retention, collect_garbage
from esper_assets.checkpoints.store import CHECKPOINT
from esper_assets.errors import CheckpointExists, EsperError, InvalidCheckpoint, InvalidInput
from esper_assets.flows.landing import CheckpointFolders
from esper_assets.storage.cache import PersistentKernelCache
from esper_assets.storage.repository import AssetMetadata, AssetQuery

PLATFORM_RUN = "platform"
HOTTEST = 20  # kernels named in the platform state

LOOKBACK = timedelta(seconds=60)
BATCH = 500  # checkpoints reported per tick at most; the next tick goes on

LANDED_MANIFEST = "manifest.json"
INGESTED_MARK = ".esper-ingested"  # holds the asset id; the directory is done
REJECTED_MARK = ".esper-rejected.txt"  # holds the reason; delete it to try again


@dataclass
class Cursor:
    newest: datetime | None = None
    recent: set[str] = field(default_factory=set)  # ids created within LOOKBACK of newest

    def dump(self) -> str:
        stamp = self.newest.isoformat() if self.newest else None
        return json.dumps({"t": stamp, "ids": sorted(self.recent)}, separators=(",", ":"))

    @classmethod
    def load(cls, text: str | None) -> Cursor:
        """An unreadable cursor means: look at everything again (reporting a
        checkpoint twice only adds an event)."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
            newest = datetime.fromisoformat(raw["t"]) if raw["t"] else None
            return cls(newest, {str(i) for i in raw["ids"]})
        except (ValueError, KeyError, TypeError):
            return cls()


def find_new(store: CheckpointStore, cursor: Cursor) -> tuple[list[AssetMetadata], Cursor]:
    """Checkpoints registered since ``cursor``, oldest first (at most :data:`BATCH`; the
    next tick goes on), and the cursor after them."""
    query = AssetQuery().with_type(CHECKPOINT).order_by("created_at").limit(BATCH)
    if cursor.newest is not None:
        query = query.created_after(cursor.newest - LOOKBACK)
    found: list[AssetMetadata] = []
    while True:  # pages, so a window holding more than BATCH seen ids cannot stall us
        page = store.repo.search_assets(query.offset(len(found)))
        found += page
        new = [m for m in found if m.asset_id not in cursor.recent]
        if len(page) < BATCH or len(new) >= BATCH:
            break
    if not found:
        return [], cursor
    newest = max([m.created_at for m in found] + ([cursor.newest] if cursor.newest else []))
    recent = {m.asset_id for m in found if m.created_at >= newest - LOOKBACK}
    return new, Cursor(newest, recent)


def describe(meta: AssetMetadata) -> dict[str, Any]:
    """A checkpoint's accounting as plain values (the repository's properties)."""
    p = meta.properties
    logical, stored = p.get("logical_bytes", 0), p.get("stored_bytes", 0)
    return {
        "run": p.get("run", meta.name),
        "step": p.get("step"),
        "asset_id": meta.asset_id,
        "checksum": meta.checksum or meta.asset_id,
        "parent_id": meta.parent_id or "",
        "logical_bytes": logical,
        "stored_bytes": stored,
        "stored_fraction": p.get("stored_fraction", round(stored / logical, 4) if logical else 0),
        "dedup_ratio": p.get("dedup_ratio"),
        "chunk_count": p.get("chunk_count", 0),
        "new_chunks": p.get("new_chunks", 0),
        "components": ", ".join(p.get("components", [])),
        "kernels": ", ".join(p.get("kernels", [])),
        "metrics": p.get("metrics", {}),
        "state": meta.state,
    }


def check_restorable(
    store: CheckpointStore, run_id: str, step: int | None, sample: float
) -> dict[str, Any]:
    """``CheckpointStore.verify`` on a sample of chunks, a refused read as a failure."""
    try:
        return store.verify(run_id, step, sample=sample)
    except EsperError as exc:
        return {"run": run_id, "step": step, "ok": False, "error": str(exc),
                "missing": [], "corrupt": [], "chunks": 0, "verified": 0}  # fmt: skip


# -- the landing path -----------------------------------------------------------------------
# One set of decisions for every landing zone; ``CheckpointFolders`` (a directory or an
# S3 prefix, ``flows.landing``) only lists, reads, fetches and writes files.
@dataclass(frozen=True)
class Landed:
    """One step folder looked at: ``asset_id`` when saved, ``error`` when refused."""

    location: str
    asset_id: str = ""
    error: str = ""


def ingest_landed(store: CheckpointStore, landing: CheckpointFolders) -> list[Landed]:
    """Save each complete, not yet handled ``<run>/<step>/`` folder once. A folder is
    complete when its ``manifest.json`` exists (written last by the producer); a
    malformed one gets a reason file and is not tried again until that is removed."""
    pending = {
        folder: files
        for folder, files in landing.folders().items()
        if LANDED_MANIFEST in files and not files & {INGESTED_MARK, REJECTED_MARK}
    }
    return [
        _ingest_one(store, landing, folder, pending[folder])
        for folder in sorted(pending, key=_in_order)
    ]


def _in_order(folder: str) -> tuple[str, int, str]:
    """By run, then by step as a number (``9`` before ``10``)."""
    run, _, step = folder.partition("/")
    return run, len(step), step


def _ingest_one(
    store: CheckpointStore, landing: CheckpointFolders, folder: str, files: frozenset[str]
) -> Landed:
    try:
        landed = read_landed(landing, folder, files)
        with landing.local_files(folder, list(landed.files.values())) as paths:
            components = {name: paths[file] for name, file in landed.files.items()}
            info = store.save(landed.run_id, landed.step, components,
                              kernels=landed.kernels, metrics=landed.metrics)  # fmt: skip
    except CheckpointExists as exc:
        return _mark(landing, folder, REJECTED_MARK, f"{exc} (already saved; not ingested again)")
    except EsperError as exc:
        return _mark(landing, folder, REJECTED_MARK, str(exc))
    landing.write(folder, INGESTED_MARK, info.asset_id + "\n")
    return Landed(landing.where(folder), asset_id=info.asset_id)


def _mark(landing: CheckpointFolders, folder: str, mark: str, reason: str) -> Landed:
    landing.write(folder, mark, reason + "\n")
    return Landed(landing.where(folder), error=reason)


@dataclass(frozen=True)
class LandedCheckpoint:
    """What a landed folder's name and manifest say: ``files`` maps each component
    to its file in the folder."""

    run_id: str
    step: int
    files: dict[str, str]
    kernels: list[str]
    metrics: dict


def read_landed(landing: CheckpointFolders, folder: str, files: frozenset[str]) -> LandedCheckpoint:
    """The run, step, component files, kernels and metrics a landed folder (holding
    ``files``) names; InvalidCheckpoint naming ``<run>/<step>`` and the problem otherwise."""
    run_name, _, step_name = folder.partition("/")
    try:
        run_id = check_name("run id", run_name)
        step = int(step_name)
        if step < 0 or str(step) != step_name:
            raise ValueError
    except (EsperError, ValueError):
        raise InvalidCheckpoint(f"{folder}: expected <run>/<step> with step a number") from None
    doc = _manifest(landing.read(folder, LANDED_MANIFEST), folder)
    components = _component_files(doc.get("components"), files, folder)
    kernels, metrics = doc.get("kernels", []), doc.get("metrics", {})
    if not isinstance(kernels, list) or not all(isinstance(k, str) for k in kernels):
        raise InvalidCheckpoint(f"{folder}: manifest.json 'kernels' must be a list of ids")
    if not isinstance(metrics, dict):
        raise InvalidCheckpoint(f"{folder}: manifest.json 'metrics' must be an object")
    return LandedCheckpoint(run_id, step, components, kernels, metrics)


def _manifest(data: bytes, where: str) -> dict:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidCheckpoint(f"{where}: manifest.json is not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise InvalidCheckpoint(f"{where}: manifest.json must be an object")
    return doc


def _component_files(named: object, present: frozenset[str], where: str) -> dict[str, str]:
    """{component: file name}, each a plain name of a regular file in the folder."""
    if not isinstance(named, dict) or not named:
        raise InvalidCheckpoint(
            f"{where}: manifest.json needs 'components': {{name: file in this directory}}"
        )
    files = {}
    for name, filename in named.items():
        check_name("component", name)
        if not isinstance(filename, str):
            raise InvalidCheckpoint(f"{where}: component {name!r} must name a file")
        check_name(f"component {name!r}'s file", filename)
        if filename not in present:
            raise InvalidCheckpoint(
                f"{where}: component {name!r} names {filename!r}, which is not a file here"
            )
        files[name] = filename
    return files


# -- scheduled jobs ---------------------------------------------------------------------------
NO_RULES = RetentionPolicy(keep_last=None, keep_every=None, keep_newer_than=None)


# Each rule's lowest value (RetentionPolicy's bounds; days are a float).
LOWEST = {"keep_last": 0, "keep_every": 1, "keep_newer_than_days": 0, "keep_best": 0}


def policy_with(
    base: RetentionPolicy,
    *,
    keep_last: int | None = None,
    keep_every: int | None = None,
    keep_newer_than_days: float | None = None,
    keep_best: int | None = None,
    metric: str | None = None,
    higher_is_better: bool = False,
    action: str | None = None,
    names: Mapping[str, str] | None = None,
) -> RetentionPolicy:
    """``base`` with the rules given here instead (None: as ``base`` has it). A bad
    value raises InvalidInput naming the field as the caller spells it: ``names`` maps
    a keyword to that (the CLI's ``--keep-days`` for ``keep_newer_than_days``)."""
    named = {k: (names or {}).get(k, k) for k in (*LOWEST, "metric")}
    _check_rules(base, named, metric, keep_last=keep_last, keep_every=keep_every,
                 keep_newer_than_days=keep_newer_than_days, keep_best=keep_best)  # fmt: skip
    days = None if keep_newer_than_days is None else timedelta(days=keep_newer_than_days)
    changes = {"keep_last": keep_last, "keep_every": keep_every, "keep_newer_than": days,
               "keep_best": keep_best, "metric": metric, "action": action,
               "higher_is_better": higher_is_better or None}  # fmt: skip
    return replace(base, **{k: v for k, v in changes.items() if v is not None})


def _check_rules(
    base: RetentionPolicy, named: dict[str, str], metric: str | None, **given: float | None
) -> None:
    """InvalidInput for a rule below its bound or a keep_best/metric without the other;
    before RetentionPolicy's own checks, which know only its field names."""
    for rule, value in given.items():
        if value is not None and not value >= LOWEST[rule]:  # NaN too
            raise InvalidInput(f"{named[rule]} must be >= {LOWEST[rule]}, not {value!r}")
    if given["keep_best"] and not (metric or base.metric):
        raise InvalidInput(
            f"{named['keep_best']} needs {named['metric']} NAME (the manifest metric to rank by)"
        )
    if metric is not None and given["keep_best"] is None and not base.keep_best:
        raise InvalidInput(
            f"{named['metric']} is used only with {named['keep_best']} K (the best K steps by it)"
        )


def retain(
    store: CheckpointStore, policy: RetentionPolicy, grace: timedelta, dry_run: bool = False
) -> dict[str, Any]:
    """Retention then garbage collection: what each did, as plain values."""
    kept = apply_retention(store, policy, dry_run=dry_run)
    freed = collect_garbage(store, grace=grace, dry_run=dry_run)
    return {"policy": policy.describe(), "retention": kept.as_dict(), "gc": freed.as_dict()}


def platform_state(
    store: CheckpointStore, cache: PersistentKernelCache, cursors: dict[str, str | None]
) -> dict[str, bytes]:
    """The platform's own state as JSON components: repository counts by type and
    state, cache stats and hottest kernels, the sensors' cursors."""

    def as_json(value: object) -> bytes:
        return json.dumps(value, sort_keys=True, default=str, indent=1).encode()

    return {
        "repository": as_json(store.repo.get_usage_analytics()),
        "cache": as_json({"stats": cache.get_stats(), "hottest": cache.hottest(HOTTEST)}),
        "sensors": as_json(cursors),
    }


def save_platform_state(store: CheckpointStore, components: dict[str, bytes]) -> CheckpointInfo:
    """Save ``components`` as the next step of the ``platform`` run."""
    return store.save(PLATFORM_RUN, store.next_step(PLATFORM_RUN), components)
