"""Checkpoints as assets: incremental, deduplicated, verified, restored all or nothing.

A training process imports this alone (no Dagster)::

    from esper_assets.checkpoints import CheckpointStore
    with CheckpointStore.from_env() as store:
        store.save("run-1", 100, {"model": "model.safetensors", "optimizer": arrays})
        store.restore("run-1", dest="restored/")

Modules, each owning one thing (the package may import ``esper_assets.errors``,
``settings`` and ``storage``):

- ``store``: ``CheckpointStore`` (save, save_async, restore, load_tensors, list,
  show, verify) and its registration in the asset repository.
- ``checkpointer``: ``Checkpointer``, the "save when due" helper a loop calls.
- ``manifest``: the versioned JSON manifest and the rules on names.
- ``sources``: a component value as the pieces of one file (fixed pieces per tensor,
  content-defined chunks otherwise), snapshotted.
- ``safetensors``: the format's header, parsed with bounds checks, and written.
- ``save``: one file's pieces stored by the chunk store's workers; its manifest entry.
- ``restore``: chunks fetched and verified in parallel, each written at its offset of
  a temporary file; files renamed into place all or nothing.
- ``kasmina``: ``mapped_kernels``, the kernel ids the kasmina component's
  ``kernel_mappings`` name (added to a save's kernels).
- ``retention``: ``RetentionPolicy``, ``apply_retention`` (keep, archive or delete)
  and ``collect_garbage`` (chunks no live checkpoint references, after a grace).
"""

from esper_assets.checkpoints.checkpointer import Checkpointer
from esper_assets.checkpoints.restore import RestoreReport
from esper_assets.checkpoints.retention import (
    GcReport,
    RetentionPolicy,
    RetentionReport,
    apply_retention,
    collect_garbage,
)
from esper_assets.checkpoints.store import CheckpointInfo, CheckpointStore

__all__ = [
    "CheckpointInfo",
    "CheckpointStore",
    "Checkpointer",
    "GcReport",
    "RestoreReport",
    "RetentionPolicy",
    "RetentionReport",
    "apply_retention",
    "collect_garbage",
]
