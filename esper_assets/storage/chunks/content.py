"""Content addresses and content-defined chunking: what a chunk is called and where
a byte stream is cut into chunks. Pure functions, no storage."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from esper_assets.errors import InvalidInput

DEFAULT_AVG_SIZE = 1 << 20

_ADDRESS = re.compile(r"[0-9a-f]{64}")

# pyfastcdc's bounds on min / avg / max chunk sizes.
_MIN_AVG, _MAX_AVG = 256, 1 << 22


class FileRange(NamedTuple):
    """``length`` bytes of the open file ``fd`` from ``offset``: a chunk that the
    worker storing it reads itself, into a buffer it reuses."""

    fd: int
    offset: int
    length: int


def address_of(data: bytes | memoryview) -> str:
    """The blake3 hex digest (64 characters) of the raw bytes: a chunk's address."""
    import blake3

    return blake3.blake3(data).hexdigest()


def check_address(address: object) -> str:
    """``address`` if it is 64 lowercase hex characters, else InvalidInput."""
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise InvalidInput(
            f"chunk address {address!r:.80} is not a blake3 hex digest "
            "(64 lowercase hex characters)"
        )
    return address


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat view of unsigned bytes over ``data`` (a numpy array's view has another
    format and shape; chunking and hashing want bytes)."""
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def chunk_sizes(avg_size: int) -> tuple[int, int, int]:
    """(min, avg, max) chunk sizes for an average of ``avg_size`` bytes."""
    if not isinstance(avg_size, int) or not _MIN_AVG <= avg_size <= _MAX_AVG:
        raise InvalidInput(f"avg_size must be an int in [{_MIN_AVG}, {_MAX_AVG}], not {avg_size!r}")
    return avg_size // 4, avg_size, avg_size * 4


def split_content(
    data: bytes | bytearray | memoryview | BinaryIO, avg_size: int = DEFAULT_AVG_SIZE
) -> Iterator[memoryview | bytes]:
    """Cut ``data`` into FastCDC content-defined chunks (sizes avg/4 .. avg*4).

    A cut depends only on the bytes just before it, so inserting or changing bytes
    moves the chunks around the change only: the rest keep their addresses.

    A buffer yields memoryviews into it (no copy). A stream (anything with
    ``readinto`` or ``read``) is read in pieces of at most 2 * max size, so memory
    stays bounded whatever its length; it yields bytes (pyfastcdc reuses its buffer,
    so each chunk is copied out). An empty input yields nothing.
    """
    from pyfastcdc import FastCDC

    low, avg, high = chunk_sizes(avg_size)
    chunker = FastCDC(avg, min_size=low, max_size=high)
    if isinstance(data, bytes | bytearray | memoryview):
        for chunk in chunker.cut_buf(byte_view(data)):
            yield chunk.data
        return
    if not (hasattr(data, "readinto") or hasattr(data, "read")):
        raise InvalidInput(
            f"split_content takes bytes, a memoryview or a binary stream, not {type(data).__name__}"
        )
    for chunk in chunker.cut_stream(data):
        yield bytes(chunk.data)


def cut_points(stream: BinaryIO, avg_size: int = DEFAULT_AVG_SIZE) -> Iterator[tuple[int, int]]:
    """Where :func:`split_content` would cut ``stream``: (offset, length) of each chunk,
    without copying any out (a caller that reads them again, in parallel, wants the
    places, not the bytes)."""
    from pyfastcdc import FastCDC

    low, avg, high = chunk_sizes(avg_size)
    for chunk in FastCDC(avg, min_size=low, max_size=high).cut_stream(stream):
        yield chunk.offset, chunk.length
