"""Saving one component file: its pieces stored by the chunk store's workers (read,
hashed and written in parallel, a bounded number at a time, so memory stays bounded
whatever the size), then described as a manifest file entry.

May import: ``esper_assets.errors``, ``storage.chunks``, ``checkpoints.sources``,
``checkpoints.manifest``.
"""

from __future__ import annotations

from typing import Any

from esper_assets.checkpoints.manifest import digest_of
from esper_assets.checkpoints.sources import Source
from esper_assets.errors import InvalidCheckpoint, InvalidInput
from esper_assets.storage.chunks import ChunkStore


def store_source(chunks: ChunkStore, source: Source, workers: int = 4) -> dict[str, Any]:
    """Put ``source``'s chunks; its manifest file entry (with ``stored_bytes`` and
    ``new_chunks``, which the manifest sums and drops). InvalidCheckpoint if the file
    changed (its size, mtime or inode, or fewer bytes than it claimed)."""
    what = f"component {source.component!r} ({source.filename})"
    with source.open_pieces() as pieces:
        try:
            refs = chunks.put_many(pieces, workers=workers)
        except InvalidCheckpoint:
            raise
        except InvalidInput as exc:  # a file range came back short: the file shrank
            raise InvalidCheckpoint(f"{what}: {exc}") from None
    source.check()
    size = sum(ref.size for ref in refs)
    if size != source.size:
        raise InvalidCheckpoint(
            f"{what}: read {size} bytes where {source.size} were expected; "
            "it changed while it was being saved"
        )
    chunk_list = [[ref.address, ref.size] for ref in refs]
    entry: dict[str, Any] = {
        "path": source.filename,
        "size": size,
        "digest": digest_of(chunk_list),
        "chunks": chunk_list,
        "tensors": [t.as_dict() for t in source.tensors],
        "stored_bytes": sum(ref.stored_size for ref in refs if ref.new),
        "new_chunks": sum(1 for ref in refs if ref.new),
    }
    if source.metadata is not None:
        entry["metadata"] = source.metadata
    return entry
