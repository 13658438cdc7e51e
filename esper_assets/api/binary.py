"""``/binary``: the kernel's bytes with an ETag, conditional requests and one Range.

The ETag is the content checksum the repository records (sha256 of the bytes, hex),
computed from the bytes served, so a value served from any cache tier carries the same
tag as the registered asset. The sha256 is remembered per (id, size, xxh3-64) so a hot
kernel is hashed once, not per request; xxh3 runs at memory speed.

The body is sent in pieces of :data:`CHUNK` bytes straight from the value (memoryview
slices, no copy of the whole). A client that goes away mid-stream ends the response
quietly: uvicorn drops the remaining sends.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from threading import Lock

import xxhash
from starlette.types import Receive, Scope, Send

from esper_assets.api.errors import ApiError

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class ETags:
    """A bounded memo of sha256 by (id, size, xxh3-64 of the bytes)."""

    def __init__(self, size: int = 4096) -> None:
        self._memo: OrderedDict[tuple[str, int, int], str] = OrderedDict()
        self._size, self._lock = size, Lock()

    def of(self, kernel_id: str, data: bytes) -> str:
        key = (kernel_id, len(data), xxhash.xxh3_64_intdigest(data))
        tag = self._memo.get(key)
        if tag is None:
            tag = f'"{hashlib.sha256(data).hexdigest()}"'
            with self._lock:
                self._memo[key] = tag
                while len(self._memo) > self._size:
                    self._memo.popitem(last=False)
        return tag


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an If-None-Match header names ``etag`` (weak comparison, or ``*``)."""
    if not if_none_match:
        return False
    tags = {t.strip().removeprefix("W/") for t in if_none_match.split(",")}
    return "*" in tags or etag in tags


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (start, end exclusive) of a single ``bytes=`` range, None for the whole
    value (no header, or one we do not serve as a range: several ranges, other units,
    as RFC 9110 allows); ApiError 416 when it cannot be satisfied."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if m is None or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last n bytes
        n = int(m[2])
        if n == 0:
            raise _unsatisfiable(header, size)
        return max(0, size - n), size
    start = int(m[1])
    end = size if not m[2] else min(int(m[2]) + 1, size)
    if start >= size or (m[2] and int(m[2]) < start):
        raise _unsatisfiable(header, size)
    return start, end


def _unsatisfiable(header: str, size: int) -> ApiError:
    error = ApiError(
        416, "range_not_satisfiable",
        f"Range {header[:80]!r} is outside the kernel's {size} bytes", "Range",
    )  # fmt: skip
    error.headers = {"Content-Range": f"bytes */{size}"}
    return error


class BytesResponse:
    """An ASGI response sending ``data[start:end]`` in CHUNK pieces, without copying
    the whole value."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], data: bytes = b"",
                 start: int = 0, end: int = 0) -> None:  # fmt: skip
        self.status, self.raw_headers = status, headers
        self.data, self.start, self.end = data, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status,
                    "headers": self.raw_headers})  # fmt: skip
        if self.start == 0 and self.end == len(self.data) <= CHUNK:
            await send({"type": "http.response.body", "body": self.data})
            return
        view = memoryview(self.data)
        for offset in range(self.start, self.end, CHUNK):
            piece = view[offset : min(offset + CHUNK, self.end)]
            last = offset + CHUNK >= self.end
            await send({"type": "http.response.body", "body": bytes(piece), "more_body": not last})
        if self.start == self.end:
            await send({"type": "http.response.body", "body": b""})


_OCTETS = (b"content-type", b"application/octet-stream")
_RANGES = (b"accept-ranges", b"bytes")


def respond(kernel_id: str, data: bytes, etag: str, headers) -> BytesResponse:
    """200, 206 or 304 for ``data`` given the request's conditional and Range headers
    (``headers``: a mapping of lower-case names)."""
    base = [(b"etag", etag.encode()), _RANGES]
    span = None
    if headers:  # empty for FastBinary's plain GETs (no conditional or Range header)
        if matches(headers.get("if-none-match"), etag):
            return BytesResponse(304, base)
        if_range = headers.get("if-range")
        if not if_range or if_range == etag:
            span = byte_range(headers.get("range"), len(data))
    if span is None:
        base += [_OCTETS, (b"content-length", str(len(data)).encode())]
        return BytesResponse(200, base, data, 0, len(data))
    start, end = span
    content_range = f"bytes {start}-{end - 1}/{len(data)}".encode()
    base += [
        _OCTETS,
        (b"content-length", str(end - start).encode()),
        (b"content-range", content_range),
    ]
    return BytesResponse(206, base, data, start, end)
