"""The safetensors format, read and written without the ``safetensors`` package.

A file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and ``data_offsets`` (relative to the end of the header), then the
tensor bytes. We parse the header ourselves so that a lying file (offsets past the
end, overlapping or leaving gaps, a dtype times a shape that is not the byte length)
is refused with :class:`InvalidCheckpoint` before anything is stored, and so that each
tensor's bytes can be chunked on their own: an unchanged tensor then dedups whole.

May import: ``esper_assets.errors`` and numpy.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from esper_assets.errors import InvalidCheckpoint

MAX_HEADER_BYTES = 100 << 20  # the reference implementation's own limit

# dtype name -> (item size, numpy dtype). BF16 has no numpy dtype: its bits load as
# uint16 (``arr.view(ml_dtypes.bfloat16)`` where that package is installed).
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "<f8"), "F32": (4, "<f4"), "F16": (2, "<f2"), "BF16": (2, "<u2"),
    "I64": (8, "<i8"), "I32": (4, "<i4"), "I16": (2, "<i2"), "I8": (1, "i1"),
    "U64": (8, "<u8"), "U32": (4, "<u4"), "U16": (2, "<u2"), "U8": (1, "u1"),
    "BOOL": (1, "?"), "F8_E4M3": (1, "u1"), "F8_E5M2": (1, "u1"),
}  # fmt: skip
_FROM_NUMPY = {
    np.dtype(v).str: k for k, (_, v) in DTYPES.items() if k not in ("BF16", "F8_E4M3", "F8_E5M2")
}


@dataclass(frozen=True)
class TensorSpan:
    """One tensor: its name, dtype, shape and byte range within the whole file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "start": self.start, "end": self.end}  # fmt: skip


@dataclass(frozen=True)
class Layout:
    """A parsed file: where the header ends, its ``__metadata__``, tensors by offset."""

    header_end: int
    metadata: dict[str, str] | None
    tensors: list[TensorSpan]


def parse_header(prefix: bytes, file_size: int, what: str) -> Layout:
    """The layout of a safetensors file of ``file_size`` bytes from its first bytes
    (``prefix`` must hold the whole header: see :func:`header_length`). Every tensor
    must lie inside the file, the tensors must tile the data region exactly (no
    overlap, no gap) and each byte length must be its dtype's size times its shape."""
    header_len = header_length(prefix[:8], file_size, what)
    raw = prefix[8 : 8 + header_len]
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCheckpoint(f"{what}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidCheckpoint(f"{what}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise InvalidCheckpoint(f"{what}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    spans = sorted(
        (_span(name, entry, data_start, what) for name, entry in header.items()),
        key=lambda s: (s.start, s.end),
    )
    _check_tiling(spans, data_start, file_size, what)
    return Layout(data_start, metadata, spans)


def header_length(first8: bytes, file_size: int, what: str) -> int:
    """The JSON header's length from the file's first 8 bytes, bounds-checked."""
    if len(first8) < 8 or file_size < 8:
        raise InvalidCheckpoint(f"{what}: truncated safetensors file ({file_size} bytes)")
    (n,) = struct.unpack("<Q", first8)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise InvalidCheckpoint(
            f"{what}: the safetensors header claims {n} bytes but the file has {file_size}"
        )
    return n


def _span(name: str, entry: object, data_start: int, what: str) -> TensorSpan:
    where = f"{what}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise InvalidCheckpoint(f"{where} is not described by a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPES:
        raise InvalidCheckpoint(f"{where} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_natural(d) for d in shape)):
        raise InvalidCheckpoint(f"{where} has a bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_natural, offsets))):
        raise InvalidCheckpoint(f"{where} has bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = DTYPES[dtype][0] * math.prod(shape)
    if end < begin or end - begin != expected:
        raise InvalidCheckpoint(
            f"{where}: {dtype} x {shape} is {expected} bytes but data_offsets {offsets} "
            f"span {end - begin}"
        )
    return TensorSpan(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(spans: list[TensorSpan], data_start: int, file_size: int, what: str) -> None:
    position = data_start
    for span in spans:
        if span.start != position:
            kind = "overlaps the previous one" if span.start < position else "leaves a gap"
            raise InvalidCheckpoint(f"{what}: tensor {span.name!r} {kind} (offset {span.start})")
        position = span.end
    if position != file_size:
        kind = "past the end of" if position > file_size else "short of"
        raise InvalidCheckpoint(
            f"{what}: the tensors end at byte {position}, {kind} the file ({file_size} bytes)"
        )


# -- numpy arrays as a safetensors file -------------------------------------------------
def encode_header(
    arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[np.ndarray]]:
    """The 8-byte length + JSON header for ``arrays`` (in their order), and each array
    as a C-contiguous little-endian array whose bytes follow the header in that order."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    laid_out, offset = [], 0
    for name, array in arrays.items():
        if not isinstance(name, str) or not name:
            raise InvalidCheckpoint(f"tensor names must be non-empty strings, got {name!r}")
        array = np.asarray(array, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        dtype = _FROM_NUMPY.get(array.dtype.str)
        if dtype is None:
            raise InvalidCheckpoint(
                f"tensor {name!r}: numpy dtype {array.dtype} has no safetensors name"
            )
        header[name] = {"dtype": dtype, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}  # fmt: skip
        offset += array.nbytes
        laid_out.append(array)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the reference pads to 8 so tensors stay aligned
    return struct.pack("<Q", len(text)) + text, laid_out


def array_from(span_dtype: str, shape: tuple[int, ...] | list[int], data: bytes) -> np.ndarray:
    """A writable numpy array of ``data`` (one tensor's bytes)."""
    return np.frombuffer(bytearray(data), dtype=DTYPES[span_dtype][1]).reshape(shape)
