"""CheckpointStore: save, restore, load, list, show and verify checkpoints.

A checkpoint is a (run, step): its components' chunks in the :class:`ChunkStore`,
then its manifest registered in the :class:`AssetRepository` as a ``checkpoint``
asset (name = run id, version label ``step-<n>``, id ``checkpoint:<run>:<step>``,
parent = the run's previous step, derived_from = the kernels it uses). Chunks go
first and the manifest last, so no manifest ever names a chunk that is not stored;
a save that fails leaves at most unreferenced chunks for garbage collection.

No Dagster: a training process imports this alone (``CheckpointStore.from_env()``).
May import: ``esper_assets.errors``, ``settings``, ``storage``, and this package.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from esper_assets.checkpoints import manifest as mf
from esper_assets.checkpoints.kasmina import mapped_kernels
from esper_assets.checkpoints.restore import (
    Progress,
    RestoreReport,
    read_file,
    refuse_non_empty,
    restore_files,
)
from esper_assets.checkpoints.safetensors import array_from
from esper_assets.checkpoints.save import store_source
from esper_assets.checkpoints.sources import Source, snapshot
from esper_assets.errors import (
    AssetConflict,
    AssetExpired,
    AssetNotFound,
    CheckpointExists,
    CheckpointNotFound,
    CorruptChunk,
    InvalidCheckpoint,
    InvalidInput,
    MissingChunk,
)
from esper_assets.settings import Settings
from esper_assets.storage.chunks import ChunkStore
from esper_assets.storage.objects import object_store_from_settings
from esper_assets.storage.repository import AssetMetadata, AssetQuery, AssetRepository

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a save stored: its asset id and the manifest's accounting."""

    run_id: str
    step: int
    asset_id: str
    logical_bytes: int
    stored_bytes: int
    chunk_count: int
    new_chunks: int
    parent_id: str | None
    kernels: tuple[str, ...]


def _yield_to_training() -> None:
    """Lower the background saver's CPU priority to the lowest (nice 19), so a
    ``save_async`` takes the cycles training leaves idle instead of slowing it down.
    Linux sets priority per thread, and the threads this one starts (the chunk
    store's workers) inherit it; elsewhere this may not apply and is skipped."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def asset_id_for(run_id: str, step: int) -> str:
    """Deterministic, so a second save of one (run, step) collides on the primary key."""
    return f"checkpoint:{run_id}:{step}"


class CheckpointStore:
    """Thread-safe. ``close()`` closes the chunk store and repository only when this
    object built them (``from_env`` / ``from_settings``)."""

    def __init__(self, chunks: ChunkStore, repo: AssetRepository, *, owns: bool = False) -> None:
        self.chunks, self.repo = chunks, repo
        self._owns = owns
        self._background = ThreadPoolExecutor(
            1, thread_name_prefix="esper-checkpoint", initializer=_yield_to_training
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CheckpointStore:
        return cls.from_settings(Settings.from_env(environ))

    @classmethod
    def from_settings(cls, settings: Settings) -> CheckpointStore:
        """On the database and object store the settings name (one store for both)."""
        store = object_store_from_settings(settings)
        repo = AssetRepository.from_settings(settings, object_store=store)
        try:
            chunks = ChunkStore.from_settings(settings, store=store)
        except BaseException:
            repo.close()
            raise
        return cls(chunks, repo, owns=True)

    # -- save ---------------------------------------------------------------------------
    def save(
        self,
        run_id: str,
        step: int,
        components: Mapping[str, object],
        kernels: Iterable[str] = (),
        metrics: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Store ``components`` as step ``step`` of ``run_id`` (see the module)."""
        run_id, step, kernels, metrics = self._checked(run_id, step, components, kernels, metrics)
        return self._save(run_id, step, snapshot(components), kernels, metrics)

    def save_async(
        self,
        run_id: str,
        step: int,
        components: Mapping[str, object],
        kernels: Iterable[str] = (),
        metrics: Mapping[str, Any] | None = None,
    ) -> Future[CheckpointInfo]:
        """Like :meth:`save`, in one background worker. Arrays and bytearrays are
        copied before this returns (the caller may change them at once); files are
        read in the background and must not change meanwhile (InvalidCheckpoint)."""
        run_id, step, kernels, metrics = self._checked(run_id, step, components, kernels, metrics)
        sources = snapshot(components)
        return self._background.submit(self._save, run_id, step, sources, kernels, metrics)

    def _checked(
        self, run_id, step, components, kernels, metrics
    ) -> tuple[str, int, list[str], dict]:
        """The arguments checked before anything is stored; the kernels given and
        those the kasmina component maps seeds to."""
        if isinstance(kernels, str):
            kernels = [kernels]
        kernels = [mf.check_name("kernel id", k) for k in kernels]
        kernels = sorted(set(kernels) | set(mapped_kernels(components)))
        metrics = dict(metrics or {})
        mf.encode(metrics)  # refuse what JSON cannot hold now, not after the chunks
        return mf.check_name("run id", run_id), mf.check_step(step), kernels, metrics

    def _save(
        self, run_id: str, step: int, sources: list[Source], kernels: list[str], metrics: dict
    ) -> CheckpointInfo:
        asset_id = asset_id_for(run_id, step)
        if self._exists(asset_id):
            raise self._taken(run_id, step, asset_id)
        components: dict[str, dict] = {}
        for source in sources:
            entry = store_source(self.chunks, source)
            components[source.component] = {"kind": source.kind, "files": [entry]}
        manifest = mf.new_manifest(run_id, step, components, kernels, metrics)
        meta = self._metadata(asset_id, manifest)
        self._touch_all(run_id, step, components)
        try:
            self.repo.create_asset(meta, mf.encode(manifest))
        except AssetConflict:
            if self._exists(asset_id):  # saved meanwhile by another process
                raise CheckpointExists(
                    f"run {run_id!r} already has a checkpoint at step {step}"
                ) from None
            raise
        return CheckpointInfo(
            run_id, step, asset_id, manifest["logical_bytes"], manifest["stored_bytes"],
            manifest["chunk_count"], manifest["new_chunks"], meta.parent_id, tuple(kernels),
        )  # fmt: skip

    def _touch_all(self, run_id: str, step: int, components: dict[str, dict]) -> None:
        """Touch every chunk once more just before the manifest is registered: a save
        that ran longer than garbage collection's grace period may have lost its first
        chunks; then nothing is registered (a manifest never names a missing chunk)."""
        gone = self.chunks.touch(
            a for c in components.values() for f in c["files"] for a, _ in f["chunks"]
        )
        if gone:
            raise MissingChunk(
                f"saving run {run_id!r} step {step}: {len(gone)} of its chunks were "
                "garbage-collected while it ran (it took longer than the gc grace period); "
                "nothing was registered: save again, or raise ESPER_CHECKPOINT_GC_GRACE_HOURS"
            )

    def _metadata(self, asset_id: str, manifest: dict[str, Any]) -> AssetMetadata:
        run_id, step = manifest["run"], manifest["step"]
        earlier = [m for m in self._run_assets(run_id) if m.properties.get("step", -1) < step]
        parent = max(earlier, key=lambda m: m.properties["step"]) if earlier else None
        logical, stored = manifest["logical_bytes"], manifest["stored_bytes"]
        return AssetMetadata(
            asset_type=CHECKPOINT,
            name=run_id,
            version=mf.version_label(step),
            asset_id=asset_id,
            parent_id=parent.asset_id if parent else None,
            derived_from=[k for k in manifest["kernels"] if self._is_kernel(k)],
            properties={
                "run": run_id,
                "step": step,
                "logical_bytes": logical,
                "stored_bytes": stored,
                "stored_fraction": round(stored / logical, 4) if logical else 0.0,
                "dedup_ratio": round(logical / stored, 2) if stored else None,
                "chunk_count": manifest["chunk_count"],
                "new_chunks": manifest["new_chunks"],
                "components": sorted(manifest["components"]),
                "kernels": manifest["kernels"],
                "metrics": manifest["metrics"],
            },
        )

    def _is_kernel(self, kernel_id: str) -> bool:
        """Kernels are registered under their kernel id (flows.kernels)."""
        try:
            return self.repo.get_metadata(kernel_id).asset_type == "kernel"
        except AssetNotFound:
            return False

    def _taken(self, run_id: str, step: int, asset_id: str) -> CheckpointExists:
        if self.repo.get_metadata(asset_id).expires_at is not None:
            return CheckpointExists(
                f"run {run_id!r} step {step} was deleted by retention and its id stays "
                "taken (the repository keeps the deleted manifest for the audit trail); "
                "save it under another step"
            )
        return CheckpointExists(f"run {run_id!r} already has a checkpoint at step {step}")

    def _exists(self, asset_id: str) -> bool:
        try:
            self.repo.get_metadata(asset_id)
        except AssetNotFound:
            return False
        return True

    # -- find ---------------------------------------------------------------------------
    def next_step(self, run_id: str) -> int:
        """One past the run's highest step, deleted steps included (their ids stay
        taken); 0 for a new run. For callers that number their saves themselves."""
        query = AssetQuery().with_type(CHECKPOINT).with_name(mf.check_name("run id", run_id))
        steps = [
            m.properties.get("step", -1) for m in self.repo.search_assets(query.include_expired())
        ]
        return max(steps, default=-1) + 1

    def _run_assets(self, run_id: str) -> list[AssetMetadata]:
        return self.repo.search_assets(AssetQuery().with_type(CHECKPOINT).with_name(run_id))

    def _find(self, run_id: str, step: int | None) -> AssetMetadata:
        mf.check_name("run id", run_id)
        if step is None:
            found = self._run_assets(run_id)
            if not found:
                raise CheckpointNotFound(f"no checkpoint for run {run_id!r}")
            return max(found, key=lambda m: m.properties.get("step", -1))
        try:
            return self.repo.get_metadata(asset_id_for(run_id, mf.check_step(step)))
        except AssetNotFound:
            raise CheckpointNotFound(f"run {run_id!r} has no checkpoint at step {step}") from None

    def show(self, run_id: str, step: int | None = None) -> dict[str, Any]:
        """The manifest of ``run_id`` at ``step`` (default: its latest step)."""
        return self._manifest(run_id, step, record_access=True)

    def _manifest(self, run_id: str, step: int | None, record_access: bool) -> dict[str, Any]:
        """``record_access=False`` for checks (verify) that are not a use."""
        asset_id = self._find(run_id, step).asset_id
        try:
            meta, data = self.repo.get_asset(asset_id, record_access=record_access)
        except AssetExpired:  # retention deleted it (see retention.delete_checkpoint)
            raise CheckpointNotFound(
                f"run {run_id!r} has no checkpoint at step {step}: retention deleted it"
            ) from None
        return mf.decode(data, f"checkpoint {meta.asset_id}")

    def list(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """Every checkpoint (of ``run_id``), by run then step: properties, no chunks."""
        if run_id is not None:
            found = self._run_assets(mf.check_name("run id", run_id))
        else:
            found = self.repo.search_assets(AssetQuery().with_type(CHECKPOINT))
        rows = [
            {"asset_id": m.asset_id, "created_at": m.created_at, "state": m.state,
             "parent_id": m.parent_id, **m.properties}
            for m in found
        ]  # fmt: skip
        return sorted(rows, key=lambda r: (r.get("run", ""), r.get("step", -1)))

    # -- restore ------------------------------------------------------------------------
    def restore(
        self,
        run_id: str,
        step: int | None = None,
        components: Iterable[str] | None = None,
        dest: Path | str = ".",
        force: bool = False,
        progress: Progress | None = None,
    ) -> RestoreReport:
        """Write the checkpoint's files to ``dest/<component>/<file>``, all or nothing."""
        dest = Path(dest)
        refuse_non_empty(dest, force)
        manifest = self.show(run_id, step)
        files = [(name, f) for name in self._chosen(manifest, components)
                 for f in manifest["components"][name]["files"]]  # fmt: skip
        report = RestoreReport(manifest["run"], manifest["step"], dest)
        return restore_files(self.chunks, files, report, progress)

    @staticmethod
    def _chosen(manifest: dict[str, Any], components: Iterable[str] | None) -> list[str]:
        if components is None:
            return list(manifest["components"])
        chosen = [components] if isinstance(components, str) else list(components)
        unknown = [c for c in chosen if c not in manifest["components"]]
        if unknown:
            raise CheckpointNotFound(
                f"checkpoint {manifest['run']}@{manifest['step']} has no component(s) "
                f"{unknown}; it has {sorted(manifest['components'])}"
            )
        return chosen

    def load_tensors(
        self, run_id: str, step: int | None = None, component: str = "model"
    ) -> dict[str, np.ndarray]:
        """The tensors of a safetensors or arrays component, as numpy arrays."""
        manifest = self.show(run_id, step)
        (name,) = self._chosen(manifest, [component])
        kind, entry = manifest["components"][name]["kind"], manifest["components"][name]["files"][0]
        if kind not in ("safetensors", "arrays"):
            raise InvalidCheckpoint(
                f"component {name!r} is {kind}, not tensors; restore it instead"
            )
        data = memoryview(read_file(self.chunks, entry, f"{name}/{entry['path']}"))
        return {
            t["name"]: array_from(t["dtype"], t["shape"], data[t["start"] : t["end"]])
            for t in entry["tensors"]
        }

    # -- verify -------------------------------------------------------------------------
    def verify(
        self, run_id: str, step: int | None = None, sample: float | None = None
    ) -> dict[str, Any]:
        """Manifest readable and complete, every chunk listed in the store, and the
        chunks re-read and re-hashed (all, or a ``sample`` fraction of them)."""
        if sample is not None and not 0 < sample <= 1:
            raise InvalidInput(f"sample must be a fraction in (0, 1], got {sample!r}")
        manifest = self._manifest(run_id, step, record_access=False)
        addresses = sorted({a for c in manifest["components"].values()
                            for f in c["files"] for a, _ in f["chunks"]})  # fmt: skip
        missing = sorted(self.chunks.missing(addresses))
        present = [a for a in addresses if a not in set(missing)]
        count = len(present) if sample is None else math.ceil(len(present) * float(sample))
        chosen = random.sample(present, min(count, len(present)))
        corrupt = [{"address": a, "error": str(exc)} for a, exc in self._unsound(chosen)]
        return {"run": manifest["run"], "step": manifest["step"], "chunks": len(addresses),
                "missing": missing, "verified": min(count, len(present)), "corrupt": corrupt,
                "ok": not missing and not corrupt}  # fmt: skip

    def _unsound(self, addresses: list[str]) -> list[tuple[str, Exception]]:
        """(address, error) of each chunk that fails to read back whole, checked in
        parallel; a failure does not stop the others."""
        failures: list[tuple[str, Exception]] = []

        def check(address: str) -> None:
            try:
                self.chunks.verify(address)
            except (CorruptChunk, MissingChunk) as exc:
                failures.append((address, exc))

        with ThreadPoolExecutor(4, thread_name_prefix="chunk-verify") as executor:
            list(executor.map(check, addresses))
        return sorted(failures, key=lambda f: f[0])

    # -- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        self._background.shutdown(wait=True)
        if self._owns:
            self.chunks.close()
            self.repo.close()

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
