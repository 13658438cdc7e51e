"""Content addresses and content-defined chunking (no services).

address_of is blake3 of the raw bytes, the same for bytes and views; split_content
covers its input exactly, keeps chunk sizes within min/max, cuts a buffer and a
stream of the same bytes at the same places, yields nothing for an empty input,
reads a stream in bounded pieces, and keeps most addresses when bytes are inserted
near the start (FastCDC's point). Bad arguments are InvalidInput.
"""

from __future__ import annotations

import io
import random

import blake3
import numpy as np
import pytest

from esper_assets.errors import InvalidInput
from esper_assets.storage.chunks import address_of, check_address, split_content
from esper_assets.storage.chunks.content import chunk_sizes

AVG = 4096
LOW, _, HIGH = chunk_sizes(AVG)


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


class CountingStream(io.RawIOBase):
    """A stream over ``size`` pseudo-random bytes generated as they are read (blake3's
    extendable output at the read position: the same bytes however they are read),
    that records the largest read asked of it. The test never holds the whole input."""

    def __init__(self, size: int, seed: int = 0, readinto: bool = True) -> None:
        self.left = size
        self.position = 0
        self.xof = blake3.blake3(str(seed).encode())
        self.largest_read = 0
        self.reads = 0
        if not readinto:
            self.readinto = None  # type: ignore[assignment]  # only read() is offered

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        self.reads += 1
        self.largest_read = max(self.largest_read, n)
        n = self.left if n < 0 else min(n, self.left)
        data = self.xof.digest(length=n, seek=self.position)
        self.left -= n
        self.position += n
        return data

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def test_address_is_blake3_hex_of_the_raw_bytes():
    empty = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert address_of(b"") == empty
    data = random_bytes(10_000)
    assert address_of(memoryview(data)) == address_of(data)
    assert len(address_of(data)) == 64 and check_address(address_of(data))


@pytest.mark.parametrize(
    "bad", ["", "a" * 63, "a" * 65, "A" * 64, "g" * 64, "../" + "a" * 61, None, 7, b"a" * 64]
)
def test_malformed_addresses_are_invalid_input(bad):
    with pytest.raises(InvalidInput, match="chunk address"):
        check_address(bad)


def test_chunks_cover_the_input_within_their_size_bounds():
    data = random_bytes(1 << 20)
    pieces = list(split_content(data, AVG))
    assert b"".join(pieces) == data
    assert all(LOW <= len(p) <= HIGH for p in pieces[:-1])
    assert 0 < len(pieces[-1]) <= HIGH
    assert 100 < len(pieces) < 400  # about 1 MiB / (avg + min)


def test_buffer_and_stream_are_cut_at_the_same_places():
    data = random_bytes(300_000, seed=3)
    from_buffer = [bytes(p) for p in split_content(data, AVG)]
    assert list(split_content(io.BytesIO(data), AVG)) == from_buffer
    assert list(split_content(bytearray(data), AVG)) == from_buffer


def test_empty_input_yields_nothing():
    assert list(split_content(b"", AVG)) == []
    assert list(split_content(io.BytesIO(b""), AVG)) == []


def test_numpy_views_are_cut_as_their_bytes():
    array = np.random.default_rng(0).standard_normal(50_000).astype(np.float32)
    pieces = list(split_content(memoryview(array), AVG))
    assert b"".join(pieces) == array.tobytes()
    assert address_of(memoryview(array).cast("B")) == address_of(array.tobytes())


def test_inserting_bytes_near_the_start_keeps_most_addresses():
    data = random_bytes(2 << 20, seed=5)
    edited = data[:1000] + b"inserted!" * 11 + data[1000:]
    before = [address_of(p) for p in split_content(data, AVG)]
    after = [address_of(p) for p in split_content(edited, AVG)]
    changed = set(after) - set(before)
    assert 1 <= len(changed) <= 2  # the chunk(s) around the insertion only
    assert after[len(changed) :] == before[len(before) - len(after) + len(changed) :]


@pytest.mark.parametrize("readinto", [True, False], ids=["readinto", "read"])
def test_a_large_stream_is_read_in_bounded_pieces(readinto):
    size = 24 << 20  # far more than the chunker's window of 2 * max size
    stream = CountingStream(size, seed=9, readinto=readinto)
    expected = CountingStream(size, seed=9)  # the same bytes, generated again
    total = 0
    for piece in split_content(stream, AVG):
        assert len(piece) <= HIGH
        assert piece == expected.read(len(piece))
        total += len(piece)
    assert total == size and expected.left == 0
    assert 0 < stream.largest_read <= 2 * HIGH
    assert stream.reads > size // (2 * HIGH)


@pytest.mark.parametrize("avg", [0, 255, 1 << 23, 4096.0, "4096"])
def test_bad_average_sizes_are_refused(avg):
    with pytest.raises(InvalidInput, match="avg_size"):
        list(split_content(b"abc", avg))


def test_something_not_readable_is_refused():
    with pytest.raises(InvalidInput, match="binary stream"):
        list(split_content(["not", "bytes"], AVG))  # type: ignore[arg-type]
