"""The content-addressed chunk store that checkpoints are made of.

- ``content``: ``address_of`` (blake3 of the raw bytes) and ``split_content``
  (FastCDC content-defined chunks of a buffer or a stream, memory bounded).
- ``codec``: one codec byte + zstd, or raw bytes when zstd saves < 5 %.
- ``index``: the ``checkpoint_chunks`` table (migration 005) on PostgreSQL or SQLite.
- ``store``: ``ChunkStore`` (put / put_many / get / get_many / missing / verify /
  discard / archive / collect_garbage / stats) and ``ChunkRef``.
- ``gc``: garbage collection of chunks no live manifest references, with a grace
  period (``collect_chunks``, ``ChunkGcResult``).

May import: ``esper_assets.errors``, ``esper_assets.settings``, ``storage.db``,
``storage.objects``. Never the cache, the repository, checkpoints or Dagster.
"""

from esper_assets.storage.chunks.codec import MAX_CHUNK_BYTES
from esper_assets.storage.chunks.content import (
    DEFAULT_AVG_SIZE,
    address_of,
    check_address,
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
    "address_of",
    "archive_key",
    "check_address",
    "object_key",
    "split_content",
]
