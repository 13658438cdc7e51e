"""How a chunk is stored: one codec byte, then the payload: zstd, or the raw bytes
when compressing would not pay.

Whether it pays is asked of a 64 KiB sample first (what borg's ``auto`` mode does
with lz4): a chunk is compressed only if zstd shrinks the sample by >= 10 %, and
then kept compressed only if the whole chunk shrinks by >= 5 %. Measured here
(``esper bench checkpoints``): random-looking fp32 weights shrink by ~8 % at
~0.6-0.8 GB/s per core, six times the cost of hashing them, for a saving dedup
dwarfs; bf16 weights (~22 %), text, sparse and zero-filled data pass the test.
Byte-shuffling fp32 before zstd lifts its ratio to ~1.19, but numpy's shuffle runs
at ~0.4 GB/s, so it does not pay either."""

from __future__ import annotations

import threading

RAW = b"\x00"
ZSTD = b"\x01"

# A stored chunk may not decode to more than this: a damaged or hostile object that
# claims a huge size must not make a reader allocate it.
MAX_CHUNK_BYTES = 64 << 20

_MIN_SAVING = 0.05
_SAMPLE = 64 << 10
_SAMPLE_MIN_SAVING = 0.10
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


def _worth_trying(data: bytes | memoryview, level: int) -> bool:
    """Whether a sample from the middle of ``data`` shrinks enough under zstd."""
    if len(data) <= 2 * _SAMPLE:
        return True
    middle = len(data) // 2
    sample = memoryview(data)[middle - _SAMPLE // 2 : middle + _SAMPLE // 2]
    return len(_compressor(level).compress(sample)) <= _SAMPLE * (1 - _SAMPLE_MIN_SAVING)


def encode(data: bytes | memoryview, level: int) -> list[bytes | memoryview]:
    """The object to store for ``data``, as parts to write in order (the raw bytes
    are not copied): zstd when it pays (see the module), else raw."""
    if _worth_trying(data, level):
        packed = _compressor(level).compress(data)
        if len(packed) <= len(data) * (1 - _MIN_SAVING):
            return [ZSTD, packed]
    return [RAW, data]


def decode(blob: bytes | memoryview) -> memoryview:
    """The raw bytes of a stored chunk: a view into ``blob`` when it was stored raw,
    else into this thread's decompression buffer (valid until the thread's next
    decode: copy what you keep). DecodeError saying what is wrong."""
    import zstandard

    codec, payload = bytes(blob[:1]), memoryview(blob)[1:]
    if codec == RAW:
        return payload
    if codec != ZSTD:
        raise DecodeError(f"unknown codec byte {codec!r} (empty or not a chunk object)")
    try:
        size = zstandard.frame_content_size(payload)
        if not 0 <= size <= MAX_CHUNK_BYTES:  # -1: no size; we always write one
            raise DecodeError(f"its zstd frame header is damaged or claims {size} bytes")
        return _decompress_into_buffer(payload, size)
    except zstandard.ZstdError as exc:
        raise DecodeError(f"zstd cannot decompress it: {exc}") from exc


def _decompress_into_buffer(payload: memoryview, size: int) -> memoryview:
    """The frame's ``size`` bytes in this thread's reused buffer (a fresh buffer per
    chunk made decompression 1.6x slower here)."""
    buffer = getattr(_local, "output", None)
    if buffer is None or len(buffer) < size + 1:
        buffer = _local.output = bytearray(max(size + 1, 1 << 20))
    view = memoryview(buffer)
    got = 0
    with _decompressor().stream_reader(payload) as reader:
        # Read one byte past the size the header claims: the frame must end there,
        # and reading to its end is what checks its checksum.
        while got <= size and (n := reader.readinto(view[got : size + 1])):
            got += n
    if got != size:
        raise DecodeError(f"its zstd frame holds {got} bytes, its header says {size}")
    return view[:size]
