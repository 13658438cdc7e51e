"""Framed values (esper_assets.storage.cache.framing).

Covers: encode/pack/unpack/decode round trips for the none, zstd and gzip codecs
(hypothesis over arbitrary and compressible bytes); small and incompressible
values stored raw; every single flipped bit anywhere in a frame (magic, checksum,
version, codec byte, created/expiry times, payload) raising CorruptValue; truncated
frames; payloads that pass the checksum but do not decode; ``Frame.expired``
(0 = never); ``peek_expires_ms``; unknown compression names raising ConfigError;
bounded decompression: forged frames (valid checksum) inflating past
``max_decoded_bytes`` refused with CorruptValue without allocating their output;
``raw_values`` (a batch's fast check) agreeing with unpack + expired + decode.
"""

from __future__ import annotations

import random
import struct
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from xxhash import xxh3_64_intdigest

from esper_assets.errors import ConfigError, CorruptValue
from esper_assets.storage.cache.framing import (
    DEFAULT_MAX_DECODED_BYTES,
    HEADER_SIZE,
    MIN_COMPRESS_BYTES,
    VERSION,
    Codec,
    Codecs,
    Frame,
    FrameParts,
    Payload,
    pack,
    peek_expires_ms,
    raw_values,
    unpack,
    unpack_parts,
)

CODEC_NAMES = ["none", "zstd", "gzip"]
CREATED_MS = 1_700_000_000_123
EXPIRES_MS = 1_700_000_600_456

# The header ends with: ... | version u8 | codec u8 | created_ms i64 | expires_ms i64
EXPIRES_OFFSET = HEADER_SIZE - 8
CREATED_OFFSET = HEADER_SIZE - 16
CODEC_OFFSET = HEADER_SIZE - 17
VERSION_OFFSET = HEADER_SIZE - 18

arbitrary_bytes = st.binary(max_size=8192)
compressible_bytes = st.builds(
    lambda unit, times: unit * times,
    st.binary(min_size=1, max_size=32),
    st.integers(min_value=1, max_value=600),
)
timestamps = st.integers(min_value=0, max_value=2**62)


def frame_of(value: bytes, codec: str = "zstd", expires_ms: int = EXPIRES_MS) -> bytes:
    return pack(Codecs(codec).encode(value), CREATED_MS, expires_ms)


def flip_bit(blob: bytes, bit: int) -> bytes:
    damaged = bytearray(blob)
    damaged[bit // 8] ^= 1 << (bit % 8)
    return bytes(damaged)


# -- round trips --------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODEC_NAMES)
@settings(max_examples=150, deadline=None)
@given(value=st.one_of(arbitrary_bytes, compressible_bytes), created=timestamps, expires=timestamps)
def test_round_trip_restores_value_and_times(codec, value, created, expires):
    codecs = Codecs(codec)
    payload = codecs.encode(value)
    frame = unpack(pack(payload, created, expires))

    assert codecs.decode(frame) == value
    assert frame.codec is payload.codec
    assert (frame.created_ms, frame.expires_ms) == (created, expires)
    assert payload.raw_size == len(value)


@pytest.mark.parametrize(("name", "codec"), [("zstd", Codec.ZSTD), ("gzip", Codec.GZIP)])
def test_compressible_value_is_compressed_with_the_configured_codec(name, codec):
    value = b"conv2d 3x3 weights " * 1000
    payload = Codecs(name).encode(value)

    assert payload.codec is codec
    assert len(payload.data) < len(value) // 10
    assert Codecs(name).decode(unpack(pack(payload, CREATED_MS, 0))) == value


def test_codec_none_never_compresses():
    value = b"a" * 100_000
    assert Codecs("none").encode(value).codec is Codec.NONE


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_value_below_min_compress_bytes_is_stored_raw(codec):
    value = b"a" * (MIN_COMPRESS_BYTES - 1)
    payload = Codecs(codec).encode(value)
    assert payload.codec is Codec.NONE
    assert payload.data == value


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_incompressible_value_is_stored_raw(codec):
    value = random.Random(7).randbytes(64 * 1024)
    payload = Codecs(codec).encode(value)
    assert payload.codec is Codec.NONE
    assert payload.data == value


@pytest.mark.parametrize("codec", ["zstd", "gzip"])
def test_compression_saving_under_five_percent_is_not_kept(codec):
    noise = random.Random(3).randbytes(10_000)
    barely = noise + bytes(300)  # ~3% compressible
    worth_it = noise + bytes(1_500)  # ~13% compressible
    assert Codecs(codec).encode(barely).codec is Codec.NONE
    assert Codecs(codec).encode(worth_it).codec is not Codec.NONE


def test_empty_value_round_trips():
    blob = frame_of(b"")
    assert len(blob) == HEADER_SIZE
    assert Codecs().decode(unpack(blob)) == b""


def test_codecs_are_safe_to_share_between_threads():
    codecs = Codecs("zstd")
    values = [bytes([i]) * (1000 + i) for i in range(8)]
    errors: list[BaseException] = []

    def work(value: bytes) -> None:
        try:
            for _ in range(200):
                assert codecs.decode(unpack(pack(codecs.encode(value), 1, 0))) == value
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# -- damage -------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_single_bit_flip_in_a_small_frame_is_detected(codec):
    blob = frame_of(b"kernel bytes " * 30, codec)  # compressible: zstd/gzip really compress
    unpack(blob)  # the undamaged frame is fine
    for bit in range(len(blob) * 8):
        with pytest.raises(CorruptValue):
            unpack(flip_bit(blob, bit))


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(arbitrary_bytes, compressible_bytes),
    codec=st.sampled_from(CODEC_NAMES),
    data=st.data(),
)
def test_any_flipped_bit_in_any_frame_raises_corrupt_value(value, codec, data):
    blob = frame_of(value, codec)
    bit = data.draw(st.integers(min_value=0, max_value=len(blob) * 8 - 1), label="bit")
    with pytest.raises(CorruptValue):
        unpack(flip_bit(blob, bit))


def test_header_field_offsets_used_by_these_tests():
    blob = pack(Payload.of(Codec.GZIP, b"", 0), CREATED_MS, EXPIRES_MS)
    assert blob[:2] == b"EK"
    assert blob[VERSION_OFFSET] == VERSION
    assert blob[CODEC_OFFSET] == Codec.GZIP
    assert struct.unpack_from("<qq", blob, CREATED_OFFSET) == (CREATED_MS, EXPIRES_MS)


def test_codec_byte_changed_to_another_valid_codec_is_detected():
    blob = bytearray(frame_of(b"raw value", "none"))
    assert blob[CODEC_OFFSET] == Codec.NONE
    blob[CODEC_OFFSET] = Codec.ZSTD
    with pytest.raises(CorruptValue):
        unpack(bytes(blob))


def test_extended_expiry_is_detected():
    blob = bytearray(frame_of(b"value"))
    struct.pack_into("<q", blob, EXPIRES_OFFSET, 0)  # "never expires"
    with pytest.raises(CorruptValue):
        unpack(bytes(blob))


def test_changed_version_byte_is_detected():
    blob = bytearray(frame_of(b"value"))
    blob[VERSION_OFFSET] ^= 0xFF
    with pytest.raises(CorruptValue):
        unpack(bytes(blob))


def test_changed_created_time_is_detected():
    blob = bytearray(frame_of(b"value"))
    struct.pack_into("<q", blob, CREATED_OFFSET, CREATED_MS + 1)
    with pytest.raises(CorruptValue):
        unpack(bytes(blob))


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_truncated_frame_raises_corrupt_value(codec):
    blob = frame_of(b"kernel bytes " * 30, codec)
    for length in range(len(blob)):
        with pytest.raises(CorruptValue):
            unpack(blob[:length])


def test_frame_with_bytes_appended_raises_corrupt_value():
    with pytest.raises(CorruptValue):
        unpack(frame_of(b"value") + b"\x00")


def test_unknown_codec_byte_with_valid_checksum_raises_corrupt_value():
    valid = Payload.of(Codec.NONE, b"???", 3)
    bogus = Payload(codec=9, data=valid.data, raw_size=3, digest=valid.digest)
    with pytest.raises(CorruptValue, match="codec"):
        unpack(pack(bogus, CREATED_MS, 0))


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.GZIP])
def test_payload_that_does_not_decompress_raises_corrupt_value(codec):
    frame = unpack(pack(Payload.of(codec, b"definitely not compressed", 25), CREATED_MS, 0))
    with pytest.raises(CorruptValue, match=codec.name):
        Codecs().decode(frame)


# -- expiry -------------------------------------------------------------------------------
def test_expires_zero_means_never():
    assert not Frame(Codec.NONE, CREATED_MS, 0, b"").expired(2**62)


def test_expired_at_and_after_expiry_not_before():
    frame = Frame(Codec.NONE, CREATED_MS, EXPIRES_MS, b"")
    assert not frame.expired(EXPIRES_MS - 1)
    assert frame.expired(EXPIRES_MS)
    assert frame.expired(EXPIRES_MS + 1)


@pytest.mark.parametrize("expires", [0, 1, EXPIRES_MS, 2**63 - 1])
def test_peek_expires_ms_reads_expiry_from_header_alone(expires):
    blob = frame_of(b"value " * 100, expires_ms=expires)
    assert peek_expires_ms(blob) == expires
    assert peek_expires_ms(blob[:HEADER_SIZE]) == expires


def test_peek_expires_ms_returns_none_for_short_or_foreign_bytes():
    blob = frame_of(b"value")
    assert peek_expires_ms(blob[: HEADER_SIZE - 1]) is None
    assert peek_expires_ms(b"XX" + blob[2:]) is None
    assert peek_expires_ms(b"") is None


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lz4", "ZSTD", "", "snappy"])
def test_unknown_compression_name_raises_config_error(name):
    with pytest.raises(ConfigError, match=r"compression=.*unknown"):
        Codecs(name)


# -- bounded decompression (issue 8) ------------------------------------------------------
# A frame whose checksum is valid (written by a buggy or hostile peer with access to a
# tier) may still hold a decompression bomb. Codecs.decode never allocates much more than
# max_decoded_bytes: the bomb is refused with CorruptValue naming the bound.
GIB = 1 << 30
MIB = 1 << 20


def zstd_bomb(size: int, with_content_size: bool) -> bytes:
    """zstd of ``size`` zero bytes, built in 1 MiB steps (the test never holds ``size``)."""
    import io

    import zstandard

    out = io.BytesIO()
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=with_content_size)
    chunk = bytes(MIB)
    with cctx.stream_writer(out, size=size if with_content_size else -1, closefd=False) as w:
        for _ in range(size // MIB):
            w.write(chunk)
    return out.getvalue()


def gzip_bomb(size: int) -> bytes:
    import zlib

    deflate = zlib.compressobj(1, zlib.DEFLATED, 31)
    chunk = bytes(MIB)
    return b"".join([deflate.compress(chunk) for _ in range(size // MIB)] + [deflate.flush()])


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {
        "zstd-sized": zstd_bomb(GIB, with_content_size=True),
        "zstd-unsized": zstd_bomb(GIB, with_content_size=False),
        "gzip": gzip_bomb(128 * MIB),
    }


def forged(codec: Codec, packed: bytes) -> Frame:
    """A frame with a valid checksum around ``packed``: unpack accepts it."""
    return unpack(pack(Payload.of(codec, packed, len(packed)), CREATED_MS, 0))


def peak_bytes_of(call) -> tuple[BaseException | None, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            return exc, tracemalloc.get_traced_memory()[1]
        return None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("kind", "codec"),
    [("zstd-sized", Codec.ZSTD), ("zstd-unsized", Codec.ZSTD), ("gzip", Codec.GZIP)],
)
def test_bomb_is_refused_without_allocating_it(bombs, kind, codec):
    bound = 16 * MIB
    codecs = Codecs(max_decoded_bytes=bound)
    frame = forged(codec, bombs[kind])
    error, peak = peak_bytes_of(lambda: codecs.decode(frame))
    assert isinstance(error, CorruptValue), error
    assert f"max_decoded_bytes={bound}" in str(error)
    assert peak < 3 * bound, f"decoding a refused bomb peaked at {peak >> 20} MiB"


def test_default_bound_refuses_a_one_gib_zstd_frame_from_its_header(bombs):
    codecs = Codecs()
    assert codecs.max_decoded_bytes == DEFAULT_MAX_DECODED_BYTES == 512 * MIB
    frame = forged(Codec.ZSTD, bombs["zstd-sized"])
    error, peak = peak_bytes_of(lambda: codecs.decode(frame))
    assert isinstance(error, CorruptValue) and "max_decoded_bytes" in str(error)
    assert peak < 16 * MIB, f"peaked at {peak >> 20} MiB"


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_values_up_to_the_bound_decode_and_one_byte_more_does_not(codec):
    bound = 64 * 1024
    writer, reader = Codecs(codec), Codecs(codec, max_decoded_bytes=bound)
    for size in (bound - 1, bound):
        value = b"abcd" * (size // 4) + b"x" * (size % 4)
        assert reader.decode(unpack(frame_of(value, codec))) == value
    with pytest.raises(CorruptValue, match=f"max_decoded_bytes={bound}"):
        reader.decode(unpack(pack(writer.encode(b"a" * (bound + 1)), CREATED_MS, 0)))


@pytest.mark.parametrize("codec", [Codec.ZSTD, Codec.GZIP])
def test_stream_path_checks_every_frame_is_complete(codec):
    value = bytes(range(256)) * 64
    if codec is Codec.ZSTD:
        import zstandard

        packed = zstandard.ZstdCompressor(write_content_size=False).compress(value)
    else:
        import gzip

        packed = gzip.compress(value, mtime=0)
    codecs = Codecs(max_decoded_bytes=len(value))
    assert codecs.decode(forged(codec, packed)) == value
    with pytest.raises(CorruptValue, match="truncated|does not decode"):
        codecs.decode(forged(codec, packed[: len(packed) // 2]))


def test_multi_member_gzip_still_decodes_within_the_bound():
    import gzip

    packed = gzip.compress(b"a" * 1000, mtime=0) + gzip.compress(b"b" * 1000, mtime=0)
    assert (
        Codecs(max_decoded_bytes=2000).decode(forged(Codec.GZIP, packed))
        == b"a" * 1000 + b"b" * 1000
    )
    with pytest.raises(CorruptValue, match="max_decoded_bytes=1999"):
        Codecs(max_decoded_bytes=1999).decode(forged(Codec.GZIP, packed))


@pytest.mark.parametrize("bound", [0, -1, 1.5, "64", True])
def test_bad_max_decoded_bytes_raises_config_error(bound):
    with pytest.raises(ConfigError, match="max_decoded_bytes"):
        Codecs(max_decoded_bytes=bound)


# -- a frame read as header and payload (L2's get_parts) -----------------------------------
def parts_of(blob: bytes) -> tuple[bytes, bytes]:
    return blob[:HEADER_SIZE], blob[HEADER_SIZE:]


@pytest.mark.parametrize("codec", CODEC_NAMES)
@settings(max_examples=60, deadline=None)
@given(value=st.one_of(arbitrary_bytes, compressible_bytes))
def test_frame_in_two_parts_verifies_like_the_whole(codec, value):
    blob = frame_of(value, codec)
    head, payload = parts_of(blob)
    whole, split = unpack(blob), unpack_parts(head, payload)
    assert split == whole
    assert Codecs(codec).decode(split) == value


def test_frame_in_two_parts_keeps_the_payload_object_without_copying_it():
    value = random.Random(3).randbytes(256 * 1024)  # incompressible: stored raw
    head, payload = parts_of(frame_of(value))
    frame = unpack_parts(head, payload)
    assert frame.codec is Codec.NONE and frame.payload is payload
    decoded = Codecs().decode(frame)
    assert decoded is payload and type(decoded) is bytes and decoded == value


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_every_single_bit_flip_in_a_frame_in_two_parts_is_detected(codec):
    blob = frame_of(b"kernel weights " * 40, codec)
    for bit in range(len(blob) * 8):
        head, payload = parts_of(flip_bit(blob, bit))
        with pytest.raises(CorruptValue):
            unpack_parts(head, payload)


@pytest.mark.parametrize(
    "head, payload",
    [
        pytest.param(b"", b"", id="empty"),
        pytest.param(b"EK" + bytes(10), b"", id="short header"),
        pytest.param(None, b"x", id="byte appended"),
        pytest.param(None, b"", id="payload cut"),
    ],
)
def test_frame_in_two_parts_with_wrong_lengths_is_corrupt(head, payload):
    blob = frame_of(b"abc" * 200, "none")
    if head is None:  # keep the real header, change the payload's length
        head, good = parts_of(blob)
        payload = good + payload if payload else good[:-1]
    with pytest.raises(CorruptValue):
        unpack_parts(head, payload)


def test_frame_parts_measure_and_join_to_the_stored_frame():
    blob = frame_of(b"v" * 1000)
    parts = FrameParts(*parts_of(blob))
    assert len(parts) == len(blob) and parts.joined() == blob


# -- the batch check (raw_values) agrees with the slow way -------------------------------
NOW_MS = EXPIRES_MS


def slow_way(blob, now_ms: int, max_bytes: int) -> bytes | None:
    """The value as unpack, Frame.expired and Codecs.decode give it, for a raw frame;
    None for what raw_values must leave to them (anything else)."""
    try:
        frame = unpack(blob)
        if frame.codec is not Codec.NONE or frame.expired(now_ms):
            return None
        return Codecs("none", max_decoded_bytes=max_bytes).decode(frame)
    except CorruptValue:
        return None


@settings(max_examples=300, deadline=None)
@given(
    value=st.one_of(arbitrary_bytes, compressible_bytes),
    codec=st.sampled_from(CODEC_NAMES),
    expires=st.sampled_from([0, NOW_MS - 1, NOW_MS, NOW_MS + 1]),
    max_bytes=st.sampled_from([1, 4096, DEFAULT_MAX_DECODED_BYTES]),
    damage=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_raw_values_takes_exactly_the_raw_fresh_intact_frames(
    value, codec, expires, max_bytes, damage
):
    blob = frame_of(value, codec, expires)
    if damage is not None:
        blob = flip_bit(blob, damage % (len(blob) * 8))
    expected = slow_way(blob, NOW_MS, max_bytes)
    values, others = raw_values({"k": blob}, NOW_MS, max_bytes)
    if expected is None:
        assert (values, others) == ({}, ["k"])
    else:
        assert (values, others) == ({"k": expected}, [])
        assert type(values["k"]) is bytes


def test_raw_values_leaves_every_single_bit_flip_to_the_slow_way():
    blob = frame_of(random.Random(3).randbytes(300), "none")
    assert raw_values({"k": blob}, NOW_MS - 1, 1 << 20) == ({"k": blob[HEADER_SIZE:]}, [])
    for bit in range(len(blob) * 8):
        assert raw_values({"k": flip_bit(blob, bit)}, NOW_MS - 1, 1 << 20) == ({}, ["k"])


def test_raw_values_leaves_what_is_not_a_whole_frame_in_bytes_to_the_slow_way():
    blob = frame_of(b"x" * 100, "none", 0)
    blobs = {
        "bytes": blob,
        "bytearray": bytearray(blob),
        "memoryview": memoryview(blob),
        "parts": FrameParts(blob[:HEADER_SIZE], blob[HEADER_SIZE:]),
        "short": blob[: HEADER_SIZE - 1],
        "empty": b"",
    }
    values, others = raw_values(blobs, NOW_MS, 1 << 20)
    assert values == {"bytes": b"x" * 100}
    assert others == ["bytearray", "memoryview", "parts", "short", "empty"]


@pytest.mark.parametrize("magic, version", [(b"XX", VERSION), (b"EK", VERSION + 1)])
def test_raw_values_checks_magic_and_version_even_under_a_valid_checksum(magic, version):
    # another writer's format: its checksum matches, its magic or version does not
    fields = struct.pack("<BBqq", version, Codec.NONE, CREATED_MS, 0)
    checksum = xxh3_64_intdigest(b"value") ^ xxh3_64_intdigest(fields)
    blob = magic + struct.pack("<Q", checksum) + fields + b"value"
    assert len(blob) == HEADER_SIZE + 5
    assert slow_way(blob, NOW_MS, 1 << 20) is None
    assert raw_values({"k": blob}, NOW_MS, 1 << 20) == ({}, ["k"])
