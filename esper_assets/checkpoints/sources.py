"""What a component becomes before it is chunked: a :class:`Source`, one file's bytes
in *segments* that are chunked separately (a safetensors header, then each tensor),
with the checks that the file did not change while it was read.

A component value is a path to a ``.safetensors`` file (split per tensor), a
``dict[str, numpy.ndarray]`` (laid out as a safetensors file, split the same way),
or ``bytes`` / any other file path (one segment, content-defined chunks).
:func:`snapshot` copies what a caller might mutate (arrays, bytearrays) and records
each file's identity, so ``save_async`` may return before the bytes are read.

May import: ``esper_assets.errors``, ``checkpoints.safetensors``, ``checkpoints.manifest``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
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


@dataclass
class Source:
    """One file to store: its name on restore, its kind, size, tensors and segments."""

    component: str
    filename: str
    kind: str  # "safetensors", "arrays", "bytes" or "file"
    size: int
    open_segments: Callable[[], Any]  # a context manager yielding the segments
    tensors: list[TensorSpan] = field(default_factory=list)
    metadata: dict[str, str] | None = None
    check: Callable[[], None] = lambda: None  # raises if the file changed since snapshot


class FileWindow:
    """``length`` bytes of an open file from ``start``, readable as a stream (the
    chunker reads it with ``readinto``); reading past what the file holds yields less."""

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
        return Source(name, f"{name}.bin", "bytes", len(data), lambda: _segments([data]))
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
def _segments(items: list) -> Iterator[list]:
    yield items


def _arrays_source(name: str, arrays: Mapping[str, object]) -> Source:
    if not all(isinstance(a, np.ndarray) for a in arrays.values()):
        raise InvalidInput(f"component {name!r}: every value of a dict must be a numpy array")
    copies = {k: np.array(a, order="C", copy=True) for k, a in arrays.items()}
    header, laid_out = encode_header(copies)
    layout = parse_header(header, len(header) + sum(a.nbytes for a in laid_out), name)
    parts = [header] + [memoryview(a.reshape(-1).view(np.uint8)) for a in laid_out]
    size = sum(len(p) for p in parts)
    return Source(name, f"{name}.safetensors", "arrays", size, lambda: _segments(parts),
                  layout.tensors)  # fmt: skip


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
    def segments():
        with open(path, "rb") as fh:
            yield [FileWindow(fh, 0, before[0])]

    return Source(name, check_name("file name", path.name), "file", before[0], segments,
                  check=_unchanged_check(path, before, what))  # fmt: skip


def _safetensors_source(name: str, path: Path) -> Source:
    what = f"component {name!r} ({path.name})"
    before = _identity(path, what)
    size = before[0]
    with open(path, "rb") as fh:
        n = header_length(fh.read(8), size, what)
        fh.seek(0)
        layout = parse_header(fh.read(8 + min(n, MAX_HEADER_BYTES)), size, what)

    @contextmanager
    def segments():
        with open(path, "rb") as fh:
            yield [FileWindow(fh, 0, layout.header_end)] + [
                FileWindow(fh, t.start, t.end - t.start) for t in layout.tensors
            ]

    return Source(name, check_name("file name", path.name), "safetensors", size, segments,
                  layout.tensors, layout.metadata, _unchanged_check(path, before, what))  # fmt: skip
