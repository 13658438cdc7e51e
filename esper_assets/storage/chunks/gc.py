"""Garbage collection of chunks: delete those no live manifest references and no save
touched within a grace period.

The caller (checkpoints.retention) knows the manifests and passes the live addresses;
this module knows only the index and the objects. Why the grace period suffices: a
save touches (or inserts) every chunk it uses before its manifest exists, so a chunk
of a save still running was touched recently and is spared; the touched_at condition
is in the DELETE itself, so a touch that lands after we listed the rows still wins.
Each chunk goes in its own transaction, index row first, then the object, committed
after the object is gone (see ``index.remove_stale``): a failure leaves both.

May import: ``esper_assets.errors`` and this package.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from datetime import timedelta
from typing import TYPE_CHECKING, NamedTuple

from esper_assets.errors import InvalidInput

if TYPE_CHECKING:
    from esper_assets.storage.chunks.store import ChunkStore

# Chunks are not assets, so they have no audit rows: each deletion is logged instead.
log = logging.getLogger(__name__)


class ChunkGcResult(NamedTuple):
    deleted: list[str]  # addresses deleted (dry run: that would be)
    bytes_freed: int  # their stored bytes
    kept: int  # chunks the index lists afterwards
    in_grace: int  # unreferenced, but touched within the grace period: spared


def check_grace(grace: object) -> timedelta:
    if not isinstance(grace, timedelta) or grace < timedelta(0):
        raise InvalidInput(f"grace must be a non-negative timedelta, not {grace!r:.60}")
    return grace


def collect_chunks(
    chunks: ChunkStore, live: Collection[str], grace: timedelta, dry_run: bool = False
) -> ChunkGcResult:
    """Delete every chunk not in ``live`` that was last touched before ``grace`` ago."""
    grace_s = check_grace(grace).total_seconds()
    rows = chunks.index.ages(grace_s)
    unreferenced = [(a, size, old) for a, size, old in rows if a not in live]
    stale = [(a, size) for a, size, old in unreferenced if old]
    in_grace = len(unreferenced) - len(stale)
    if dry_run:
        freed = sum(size for _, size in stale)
        return ChunkGcResult([a for a, _ in stale], freed, len(rows) - len(stale), in_grace)
    deleted, freed = [], 0
    for address, _ in stale:
        size = chunks.index.remove_stale(
            address, grace_s, lambda a=address: chunks.delete_objects(a)
        )
        if size is None:  # touched since we listed it: a save is using it again
            in_grace += 1
            continue
        log.info("chunk %s deleted: no live manifest references it, untouched for %s",
                 address, grace)  # fmt: skip
        deleted.append(address)
        freed += size
    return ChunkGcResult(deleted, freed, len(rows) - len(deleted), in_grace)
