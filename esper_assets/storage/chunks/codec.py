"""How a chunk is stored: one codec byte, then the payload (zstd, or the raw bytes
when compressing does not save at least 5 %: float weights mostly do not)."""

from __future__ import annotations

import threading

RAW = b"\x00"
ZSTD = b"\x01"

# A stored chunk may not decode to more than this: a damaged or hostile object that
# claims a huge size must not make a reader allocate it.
MAX_CHUNK_BYTES = 64 << 20

_MIN_SAVING = 0.05
_local = threading.local()  # zstd contexts are not thread-safe: one per thread


class DecodeError(Exception):
    """The stored bytes are not a chunk we wrote (the caller names the chunk)."""


def _compressor(level: int):
    import zstandard

    by_level = getattr(_local, "compressors", None)
    if by_level is None:
        by_level = _local.compressors = {}
    if level not in by_level:
        # write_checksum: zstd notices a damaged frame before we hash the output.
        by_level[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return by_level[level]


def _decompressor():
    import zstandard

    if getattr(_local, "decompressor", None) is None:
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def encode(data: bytes | memoryview, level: int) -> bytes:
    """The object to store for ``data``: zstd when that saves >= 5 %, else raw."""
    packed = _compressor(level).compress(data)
    if len(packed) <= len(data) * (1 - _MIN_SAVING):
        return ZSTD + packed
    return RAW + bytes(data)


def decode(blob: bytes) -> bytes:
    """The raw bytes of a stored chunk; DecodeError saying what is wrong."""
    import zstandard

    codec, payload = blob[:1], memoryview(blob)[1:]
    if codec == RAW:
        return bytes(payload)
    if codec != ZSTD:
        raise DecodeError(f"unknown codec byte {codec!r} (empty or not a chunk object)")
    try:
        size = zstandard.frame_content_size(payload)
        if not 0 <= size <= MAX_CHUNK_BYTES:  # -1: no size; we always write one
            raise DecodeError(f"its zstd frame header is damaged or claims {size} bytes")
        return _decompressor().decompress(payload)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"zstd cannot decompress it: {exc}") from exc
