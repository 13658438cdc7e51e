"""What a component becomes before it is stored: a :class:`Source`, one file's bytes
as *pieces* (the chunks to store, in order), with the checks that the file did not
change while it was read.

A component value is a path to a ``.safetensors`` file, a ``dict[str, numpy.ndarray]``
(laid out as a safetensors file), or ``bytes`` / any other file path. Tensors are cut
per tensor into fixed pieces of :data:`TENSOR_CHUNK` bytes: a tensor's bytes never
shift, so content-defined cuts would buy nothing, and an unchanged tensor gives the
same chunks whatever changed around it. Other bytes get content-defined chunks
(FastCDC), which survive insertions. Pieces of a file are ``FileRange`` objects that
the chunk store's workers read themselves, in parallel, into buffers they reuse.
:func:`snapshot` copies what a caller might mutate (arrays, bytearrays) and records
each file's identity, so ``save_async`` may return before the bytes are read.

May import: ``esper_assets.errors``, ``checkpoints.safetensors``, ``checkpoints.manifest``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esper_assets.checkpoints.manifest import check_name
from esper_assets.checkpoints.safetensors import (
    MAX_HEADER_BYTES,
    TensorSpan,
    encode_header,
    header_length,
    parse_header,
)
from esper_assets.errors import InvalidCheckpoint, InvalidInput
from esper_assets.storage.chunks import FileRange, cut_points, split_content

TENSOR_CHUNK = 4 << 20


@dataclass
class Source:
    """One file to store: its name on restore, its kind, size, tensors and segments."""

    component: str
    filename: str
    kind: str  # "safetensors", "arrays", "bytes" or "file"
    size: int
    open_pieces: Callable[[], Any]  # a context manager yielding the pieces, in order
    tensors: list[TensorSpan] = field(default_factory=list)
    metadata: dict[str, str] | None = None
    check: Callable[[], None] = lambda: None  # raises if the file changed since snapshot


class FileWindow:
    """``length`` bytes of an open file from ``start``, readable as a stream (the
    content-defined chunker reads it with ``readinto`` to find its cut points);
    reading past what the file holds yields less."""

    def __init__(self, fh, start: int, length: int) -> None:
        self._fh, self._pos, self._left = fh, start, length

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")[: self._left]
        n = os.preadv(self._fh.fileno(), [view], self._pos) if len(view) else 0
        self._pos += n
        self._left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        buffer = bytearray(self._left if n is None or n < 0 else min(n, self._left))
        got = self.readinto(buffer)
        return bytes(buffer[:got])


def snapshot(components: Mapping[str, object]) -> list[Source]:
    """The components as sources, validated, with mutable values copied now."""
    if not isinstance(components, Mapping) or not components:
        raise InvalidInput("components must be a non-empty mapping of name -> value")
    return [_source(check_name("component", name), value) for name, value in components.items()]


def _source(name: str, value: object) -> Source:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)  # a copy of a bytearray: the caller may change it afterwards
        return Source(name, f"{name}.bin", "bytes", len(data),
                      lambda: _given(split_content(data)))  # fmt: skip
    if isinstance(value, Mapping):
        return _arrays_source(name, value)
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if path.suffix == ".safetensors":
            return _safetensors_source(name, path)
        return _file_source(name, path)
    raise InvalidInput(
        f"component {name!r}: expected a path, bytes or a dict of numpy arrays, "
        f"got {type(value).__name__}"
    )


@contextmanager
def _given(pieces: Iterable) -> Iterator[Iterable]:
    yield pieces


def fixed_pieces(length: int, size: int = TENSOR_CHUNK) -> Iterator[tuple[int, int]]:
    """(offset, length) of consecutive pieces of at most ``size`` bytes."""
    for start in range(0, length, size):
        yield start, min(size, length - start)


def _buffer_pieces(parts: list[memoryview]) -> Iterator[memoryview]:
    for part in parts:
        for start, n in fixed_pieces(len(part)):
            yield part[start : start + n]


def _file_pieces(fd: int, spans: list[tuple[int, int]]) -> Iterator[FileRange]:
    """Fixed pieces of each (start, length) span of the open file ``fd``."""
    for start, length in spans:
        for offset, n in fixed_pieces(length):
            yield FileRange(fd, start + offset, n)


def _arrays_source(name: str, arrays: Mapping[str, object]) -> Source:
    if not all(isinstance(a, np.ndarray) for a in arrays.values()):
        raise InvalidInput(f"component {name!r}: every value of a dict must be a numpy array")
    copies = {k: np.array(a, order="C", copy=True) for k, a in arrays.items()}
    header, laid_out = encode_header(copies)
    layout = parse_header(header, len(header) + sum(a.nbytes for a in laid_out), name)
    parts = [memoryview(header)] + [memoryview(a.reshape(-1).view(np.uint8)) for a in laid_out]
    size = sum(len(p) for p in parts)
    return Source(name, f"{name}.safetensors", "arrays", size,
                  lambda: _given(_buffer_pieces(parts)), layout.tensors)  # fmt: skip


def _identity(path: Path, what: str) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise InvalidCheckpoint(f"{what}: cannot read {path} ({exc.strerror})") from None
    if not path.is_file():
        raise InvalidCheckpoint(f"{what}: {path} is not a regular file")
    return st.st_size, st.st_mtime_ns, st.st_ino


def _unchanged_check(path: Path, before: tuple[int, int, int], what: str) -> Callable[[], None]:
    def check() -> None:
        if _identity(path, what) != before:
            raise InvalidCheckpoint(f"{what}: {path} changed while it was being saved")

    return check


def _file_source(name: str, path: Path) -> Source:
    what = f"component {name!r}"
    before = _identity(path, what)

    @contextmanager
    def pieces():
        with open(path, "rb") as fh:
            cuts = cut_points(FileWindow(fh, 0, before[0]))
            yield (FileRange(fh.fileno(), offset, n) for offset, n in cuts)

    return Source(name, check_name("file name", path.name), "file", before[0], pieces,
                  check=_unchanged_check(path, before, what))  # fmt: skip


def _safetensors_source(name: str, path: Path) -> Source:
    what = f"component {name!r} ({path.name})"
    before = _identity(path, what)
    size = before[0]
    with open(path, "rb") as fh:
        n = header_length(fh.read(8), size, what)
        fh.seek(0)
        layout = parse_header(fh.read(8 + min(n, MAX_HEADER_BYTES)), size, what)

    spans = [(0, layout.header_end)] + [(t.start, t.end - t.start) for t in layout.tensors]

    @contextmanager
    def pieces():
        with open(path, "rb") as fh:
            yield _file_pieces(fh.fileno(), spans)

    return Source(name, check_name("file name", path.name), "safetensors", size, pieces,
                  layout.tensors, layout.metadata, _unchanged_check(path, before, what))  # fmt: skip
