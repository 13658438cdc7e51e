"""Saving one component file: its segments cut into content-defined chunks, put in
the chunk store in small batches (memory stays bounded), hashed whole on the way,
and described as a manifest file entry.

May import: ``esper_assets.errors``, ``storage.chunks``, ``checkpoints.sources``.
"""

from __future__ import annotations

from typing import Any

import blake3

from esper_assets.checkpoints.sources import Source
from esper_assets.errors import InvalidCheckpoint
from esper_assets.storage.chunks import ChunkStore, split_content

BATCH = 16  # chunks compressed and written at a time (~16 MB at the default size)


def store_source(chunks: ChunkStore, source: Source, workers: int = 4) -> dict[str, Any]:
    """Put ``source``'s chunks; its manifest file entry (with ``stored_bytes`` and
    ``new_chunks``, which the manifest sums and drops). InvalidCheckpoint if the file
    changed (its size, mtime or inode, or fewer bytes than it claimed)."""
    hasher = blake3.blake3()
    refs: list[list] = []
    stored = new = 0
    batch: list = []

    def flush() -> None:
        nonlocal stored, new
        for ref in chunks.put_many(batch, workers=workers):
            refs.append([ref.address, ref.size])
            if ref.new:
                stored += ref.stored_size
                new += 1
        batch.clear()

    with source.open_segments() as segments:
        for segment in segments:
            for piece in split_content(segment):
                hasher.update(piece)
                batch.append(piece)
                if len(batch) >= BATCH:
                    flush()
        flush()
    source.check()
    size = sum(size for _, size in refs)
    if size != source.size:
        raise InvalidCheckpoint(
            f"component {source.component!r}: read {size} bytes of {source.filename} "
            f"where {source.size} were expected; it changed while it was being saved"
        )
    entry: dict[str, Any] = {
        "path": source.filename,
        "size": size,
        "blake3": hasher.hexdigest(),
        "chunks": refs,
        "tensors": [t.as_dict() for t in source.tensors],
        "stored_bytes": stored,
        "new_chunks": new,
    }
    if source.metadata is not None:
        entry["metadata"] = source.metadata
    return entry
