"""Framed values: the byte format every tier below L1 stores.

    magic "EK" | checksum u64 | version u8 | codec u8 | created_ms i64 | expires_ms i64 | payload

checksum = xxh3_64(payload) XOR xxh3_64(header fields after the checksum), so
the payload is hashed once per value and each tier's header (with its own
expiry) costs one tiny hash more. A flipped bit anywhere is caught before we try
to decompress. xxh3 rather than zlib.crc32: 4 us instead of 116 us for 256 KiB
on this machine, which is the difference between a large L2 hit costing 1.2x
and 1.6x a raw GET. ``expires_ms == 0`` means never.
Compression is chosen once per value: small or incompressible values (float
weights compress ~1.08x) are stored raw rather than paying decode cost for nothing.
"""

from __future__ import annotations

import gzip
import struct
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

import zstandard
from xxhash import xxh3_64_intdigest

from esper_assets.errors import ConfigError, CorruptValue

MAGIC = b"EK"
VERSION = 1
_HEADER = struct.Struct("<2sQBBqq")
HEADER_SIZE = _HEADER.size
_FIELDS_FROM = 10  # the header fields the checksum covers start after magic and itself
MIN_COMPRESS_BYTES = 256  # below this, compression never pays for its header and CPU
_MIN_GAIN = 0.95  # keep compressed output only if it saves at least 5%


class Codec(IntEnum):
    NONE = 0
    ZSTD = 1
    GZIP = 2


_CODECS = tuple(Codec)
_RAW = int(Codec.NONE)  # compared as a plain int: an enum member costs a lookup per value
CODEC_NAMES = {"none": Codec.NONE, "zstd": Codec.ZSTD, "gzip": Codec.GZIP}


@dataclass(frozen=True, slots=True)
class Payload:
    """A value encoded once (compressed or not), ready to frame for any tier."""

    codec: Codec
    data: bytes
    raw_size: int
    digest: int  # xxh3_64 of ``data``; each tier's header hash is XORed in

    @classmethod
    def of(cls, codec: Codec, data: bytes, raw_size: int) -> Payload:
        return cls(codec, data, raw_size, xxh3_64_intdigest(data))


class Frame(NamedTuple):
    """A verified frame. A NamedTuple: built once per value read, and a frozen
    dataclass's __init__ costs ~0.5 us more (a cold get_many builds hundreds)."""

    codec: Codec
    created_ms: int
    expires_ms: int
    payload: bytes

    def expired(self, now_ms: int) -> bool:
        return self.expires_ms != 0 and self.expires_ms <= now_ms


class FrameParts:
    """A frame as a tier read it in two objects: the header and the payload
    (verified by :func:`unpack_parts`; ``len`` is the frame's)."""

    __slots__ = ("head", "payload", "atomic")

    def __init__(self, head: bytes, payload: bytes, atomic: bool = True) -> None:
        self.head = head
        self.payload = payload
        # False: read by two commands another client's write may fall between, so a
        # checksum mismatch may be a torn read rather than damage (read it again).
        self.atomic = atomic

    def __len__(self) -> int:
        return len(self.head) + len(self.payload)

    def joined(self) -> bytes:
        """The frame as one ``bytes`` (a copy: for the rare paths that need it whole)."""
        return self.head + self.payload


def now_ms() -> int:
    return time.time_ns() // 1_000_000


DEFAULT_MAX_DECODED_BYTES = 512 << 20  # the largest value any caller stores by default
_STREAM_STEP = 1 << 20  # output per step when a zstd frame does not state its size


class Codecs:
    """Thread-safe compressors: zstd contexts are not shareable between threads.

    ``max_decoded_bytes`` bounds what :meth:`decode` produces: a frame passes its
    checksum whenever its writer computed one, so a buggy or hostile writer with
    access to a tier can store a tiny payload that inflates to gigabytes. Decoding
    never allocates more than the bound plus one step (about 1 MiB) and refuses such a
    payload with :class:`CorruptValue`. Set it to the largest value ever stored
    (the cache passes its ``max_value_bytes``).
    """

    def __init__(
        self,
        codec: str = "zstd",
        level: int = 3,
        *,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    ) -> None:
        if codec not in CODEC_NAMES:
            raise ConfigError(f"compression={codec!r} is unknown; use one of {sorted(CODEC_NAMES)}")
        if (
            not isinstance(max_decoded_bytes, int)
            or isinstance(max_decoded_bytes, bool)
            or max_decoded_bytes < 1
        ):
            raise ConfigError(
                f"max_decoded_bytes={max_decoded_bytes!r} must be a positive integer (bytes): "
                "the largest value a frame may decode to"
            )
        self.codec = CODEC_NAMES[codec]
        self.level = level
        self.max_decoded_bytes = max_decoded_bytes
        self._local = threading.local()

    def _zstd(self) -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
        pair = getattr(self._local, "zstd", None)
        if pair is None:
            pair = (zstandard.ZstdCompressor(level=self.level), zstandard.ZstdDecompressor())
            self._local.zstd = pair
        return pair

    def encode(self, value: bytes) -> Payload:
        size = len(value)
        if self.codec is Codec.NONE or size < MIN_COMPRESS_BYTES:
            return Payload.of(Codec.NONE, value, size)
        if self.codec is Codec.ZSTD:
            packed = self._zstd()[0].compress(value)
        else:
            packed = gzip.compress(value, compresslevel=min(max(self.level, 1), 9), mtime=0)
        if len(packed) > size * _MIN_GAIN:
            return Payload.of(Codec.NONE, value, size)
        return Payload.of(self.codec, packed, size)

    def decode(self, frame: Frame) -> bytes:
        """The value in ``frame``; CorruptValue if it does not decode or would decode to
        more than ``max_decoded_bytes`` (refused before allocating more than that)."""
        try:
            if frame.codec is Codec.NONE:
                if len(frame.payload) > self.max_decoded_bytes:
                    raise self._too_large(frame.codec, f"is {len(frame.payload)} bytes")
                return frame.payload
            if frame.codec is Codec.ZSTD:
                return self._unzstd(frame.payload)
            return self._gunzip(frame.payload)
        except (zstandard.ZstdError, OSError, EOFError, zlib.error) as exc:
            raise CorruptValue(f"payload does not decode as {frame.codec.name}: {exc}") from exc

    def _too_large(self, codec: Codec, how: str) -> CorruptValue:
        return CorruptValue(
            f"{codec.name} payload {how}, over max_decoded_bytes={self.max_decoded_bytes}: "
            "not a value this store wrote (a forged or damaged frame), treated as corrupt; "
            "raise max_decoded_bytes only if values this large are really stored"
        )

    def _unzstd(self, payload: bytes) -> bytes:
        limit = self.max_decoded_bytes
        size = zstandard.frame_content_size(payload)  # from the header; -1 when not stated
        if size > limit:
            raise self._too_large(Codec.ZSTD, f"states a decoded size of {size} bytes")
        if size >= 0:
            # One allocation of exactly ``size``; zstd fails if the data disagrees with it.
            return self._zstd()[1].decompress(payload)
        # No size in the header (our encoder always writes one): decode in bounded steps.
        # ZstdDecompressionObj.decompress has no output cap, so feed it input in slices
        # small enough that one slice cannot inflate past what is left of the bound
        # (a zstd block turns >= 4 input bytes into <= 128 KiB: at most 32768x).
        stream = self._zstd()[1].decompressobj()
        chunks: list[bytes] = []
        produced, offset, view = 0, 0, memoryview(payload)
        while offset < len(view) and not stream.eof:
            step = max(64, min(_STREAM_STEP, (limit - produced) >> 15))
            out = stream.decompress(view[offset : offset + step])
            offset += step
            produced += len(out)
            if produced > limit:
                raise self._too_large(Codec.ZSTD, f"decodes to more than {limit} bytes")
            chunks.append(out)
        if not stream.eof:
            raise CorruptValue("ZSTD payload is truncated: its frame does not end")
        return b"".join(chunks)

    def _gunzip(self, payload: bytes) -> bytes:
        """gzip.decompress (members one after the other) with zlib's max_length as the cap."""
        limit = self.max_decoded_bytes
        chunks: list[bytes] = []
        produced, data = 0, payload
        while data:
            member = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer
            out = member.decompress(data, limit + 1 - produced)
            produced += len(out)
            if produced > limit:
                raise self._too_large(Codec.GZIP, f"decodes to more than {limit} bytes")
            if not member.eof:
                raise CorruptValue("GZIP payload is truncated: a member does not end")
            chunks.append(out)
            data = member.unused_data
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def pack(payload: Payload, created_ms: int, expires_ms: int) -> bytes:
    fields = _HEADER.pack(MAGIC, 0, VERSION, payload.codec, created_ms, expires_ms)[_FIELDS_FROM:]
    checksum = payload.digest ^ xxh3_64_intdigest(fields)
    return (
        _HEADER.pack(MAGIC, checksum, VERSION, payload.codec, created_ms, expires_ms) + payload.data
    )


def unpack(blob: bytes) -> Frame:
    """Parse and verify a frame; raise :class:`CorruptValue` on any damage.

    The payload is copied out of ``blob``. Where a tier can hand over the header and
    the payload as separate objects, :func:`unpack_parts` verifies them without
    that copy.
    """
    if len(blob) < HEADER_SIZE:
        raise CorruptValue(
            f"frame is {len(blob)} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    payload = blob[HEADER_SIZE:]
    if type(payload) is not bytes:  # a memoryview or bytearray from a driver
        payload = bytes(payload)
    codec, created_ms, expires_ms = _verify(blob, payload)
    return Frame(codec, created_ms, expires_ms, payload)


def unpack_parts(head: bytes, payload: bytes) -> Frame:
    """Verify a frame read as two objects, its header (the first HEADER_SIZE bytes)
    and its payload (the rest), exactly as :func:`unpack` verifies it whole; the
    Frame's payload *is* ``payload`` (no copy).

    Why it matters: a hit on a 256 KiB value read whole and then copied holds two
    ~256 KiB buffers at once; depending on what the process allocated before, glibc
    then grows the heap with brk and trims it again on every read (161 page faults per
    hit measured here), which made an L2 hit cost 3-4x a raw GET.
    """
    if len(head) != HEADER_SIZE:
        raise CorruptValue(f"frame header is {len(head)} bytes, not {HEADER_SIZE}")
    codec, created_ms, expires_ms = _verify(head, payload)
    return Frame(codec, created_ms, expires_ms, payload)


def _verify(head: bytes, payload: bytes | memoryview) -> tuple[Codec, int, int]:
    """The header's codec, created and expiry after checking magic, version, checksum."""
    magic, checksum, version, codec, created_ms, expires_ms = _HEADER.unpack_from(head)
    if magic != MAGIC or version != VERSION:
        raise CorruptValue(f"bad frame header (magic={magic!r}, version={version})")
    if xxh3_64_intdigest(payload) ^ xxh3_64_intdigest(head[_FIELDS_FROM:HEADER_SIZE]) != checksum:
        raise CorruptValue("checksum mismatch")
    if codec >= len(_CODECS):
        raise CorruptValue(f"unknown codec byte {codec}")
    # a tuple index: Codec(codec) costs a microsecond per read
    return _CODECS[codec], created_ms, expires_ms


def raw_values(
    blobs: Mapping[str, object], now_ms: int, max_bytes: int
) -> tuple[dict[str, bytes], list[str]]:
    """The common case of a batch read, checked fast: the values of the ``blobs`` that
    are whole frames as ``bytes``, intact, unexpired, stored raw (codec none) and at
    most ``max_bytes``; and the keys of all the others, to be read the slow way
    (:func:`unpack`, :meth:`Frame.expired`, :meth:`Codecs.decode`), which tells what
    they are (compressed, expired, damaged, not a frame) and is the authority on them.

    The checks are that way's (``_verify``'s, the expiry's, the codec-none bound),
    written out in one loop: no Frame, no exception and no call per value. A cold
    ``get_many`` of 100 small values spent ~2 us a value going through ``unpack``, half
    of it on that. test_framing checks the two ways agree on every kind of damage.
    """
    values: dict[str, bytes] = {}
    others: list[str] = []
    unpack_header = _HEADER.unpack_from
    for key, blob in blobs.items():
        if type(blob) is bytes and len(blob) >= HEADER_SIZE:
            magic, checksum, version, codec, _, expires_ms = unpack_header(blob)
            payload = blob[HEADER_SIZE:]
            if (
                codec == _RAW
                and magic == MAGIC
                and version == VERSION
                and len(payload) <= max_bytes
                and (expires_ms == 0 or expires_ms > now_ms)
                and xxh3_64_intdigest(payload) ^ xxh3_64_intdigest(blob[_FIELDS_FROM:HEADER_SIZE])
                == checksum
            ):
                values[key] = payload
                continue
        others.append(key)
    return values, others


def peek_expires_ms(head: bytes) -> int | None:
    """Expiry from the first HEADER_SIZE bytes, unverified (for cleanup scans)."""
    if len(head) < HEADER_SIZE or head[:2] != MAGIC:
        return None
    return _HEADER.unpack_from(head)[5]
