"""The content-addressed chunk store that checkpoints are made of.

- ``content``: ``address_of`` (blake3 of the raw bytes), ``split_content`` and
  ``cut_points`` (FastCDC content-defined chunks of a buffer or a stream, memory
  bounded) and ``FileRange`` (a chunk that a worker reads from an open file itself).
- ``codec``: one codec byte + zstd, or raw bytes when zstd would not pay (a sample
  is tried first).
- ``index``: the ``checkpoint_chunks`` table (migration 005) on PostgreSQL or SQLite.
- ``store``: ``ChunkStore`` (put / put_many / get / read_many / missing / verify /
  discard / archive / collect_garbage / stats) and ``ChunkRef``.
- ``gc``: garbage collection of chunks no live manifest references, with a grace
  period (``collect_chunks``, ``ChunkGcResult``).

May import: ``esper_assets.errors``, ``esper_assets.settings``, ``storage.db``,
``storage.objects``. Never the cache, the repository, checkpoints or Dagster.
"""

from esper_assets.storage.chunks.codec import MAX_CHUNK_BYTES
from esper_assets.storage.chunks.content import (
    DEFAULT_AVG_SIZE,
    FileRange,
    address_of,
    check_address,
    cut_points,
    split_content,
)
from esper_assets.storage.chunks.gc import ChunkGcResult
from esper_assets.storage.chunks.store import ChunkRef, ChunkStore, archive_key, object_key

__all__ = [
    "DEFAULT_AVG_SIZE",
    "MAX_CHUNK_BYTES",
    "ChunkGcResult",
    "ChunkRef",
    "ChunkStore",
    "FileRange",
    "address_of",
    "archive_key",
    "check_address",
    "cut_points",
    "object_key",
    "split_content",
]
