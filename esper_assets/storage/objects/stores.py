"""Object storage for large values and the L4 tier: S3 (boto3) or a directory.

Both stores speak in keys like ``kernels/abc``; the S3 store puts them under a
prefix in a bucket, the directory store under a root folder, written atomically
(temporary file + rename) so a crash never leaves half an object behind, and (when
``durable``) flushed to disk before the rename, so an object that a database row
names survives a power cut too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from esper_assets.errors import InvalidInput, StorageError, TierUnavailable

T = TypeVar("T")

# S3's answers for a key that does not exist (GetObject, HeadObject).
MISSING_KEY = ("NoSuchKey", "404")

# What ``put`` takes: the object's bytes, or its parts in order (written without
# joining them: a 4 MiB chunk and its one-byte codec prefix are not copied together).
Data = bytes | memoryview | Sequence[bytes | memoryview]


def boto_errors() -> tuple[type[Exception], ...]:
    """What a boto3 call raises: no answer (``BotoCoreError``: timeout, connection) or
    an answer of no (``ClientError``). Imported late: botocore is slow to import."""
    from botocore.exceptions import BotoCoreError, ClientError

    return BotoCoreError, ClientError


def s3_error_code(exc: Exception) -> str:
    """S3's error code (``NoSuchKey``, ``AccessDenied``, ...) for an answer of no, else ""."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def s3_status(exc: Exception) -> int:
    """The HTTP status S3 answered with, or 0 when it did not answer."""
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def s3_failure(
    exc: Exception, where: str, what: str, refused: type[StorageError] = TierUnavailable
) -> StorageError:
    """The one map from a botocore error to esper's: no answer is ``TierUnavailable``
    (a breaker may wait and try again); an answer of no is ``refused`` (the landing
    zone makes it a plain ``StorageError``: retrying will not help). A missing key
    (``MISSING_KEY``) is the caller's to handle before this."""
    error = refused if s3_error_code(exc) else TierUnavailable
    return error(f"{where}: {what} failed: {exc}")


class ObjectStore(Protocol):
    location: str

    def get(self, key: str) -> bytes | None: ...
    def get_view(self, key: str) -> memoryview | None:
        """The object's bytes, perhaps in a buffer this thread reuses: valid until the
        same thread's next ``get_view`` (copy what you keep). For bulk reads, where a
        fresh buffer per object costs more in page faults than the read itself."""
        ...

    def head(self, key: str, n: int) -> bytes | None: ...
    def put(self, key: str, data: Data, durable: bool | None = None) -> None:
        """Write ``key``; ``durable=False`` leaves flushing to a later :meth:`sync`
        (None: the store's own default)."""
        ...

    def sync(self, keys: Sequence[str]) -> None:
        """Make the objects just put under ``keys`` durable (survive a power cut)."""
        ...

    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """(key, size in bytes, last modified as Unix time) under ``prefix``."""
        ...

    def ping(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InvalidInput(
            f"object key {key!r} must be a relative path without '.', '..' or empty parts"
        )
    return key


def _parts(data: Data) -> list[bytes | memoryview]:
    return [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Ask Linux to start writing the file's dirty pages in the range to disk now,
    without waiting. ``POSIX_FADV_DONTNEED`` writes dirty pages back before it would
    drop them, and drops only pages already clean, so what was just written stays
    cached; the fsync that follows finds little left to do. (On this VM, restoring
    256 MB went from ~1.2 to ~1.9 GB/s.) Best effort: a no-op where unsupported."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _write_all(fd: int, parts: list[bytes | memoryview]) -> None:
    """``os.writev`` until every byte is written (it may write less than asked)."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]


class DirectoryObjectStore:
    """Objects as files under ``root``. ``durable`` (the default) fsyncs each object
    before renaming it into place; the cache's L4 turns it off (a lost L4 object is a
    miss, and the cache verifies what it reads), stores that databases point into
    (the repository) must keep it. A bulk writer (the chunk store) puts with
    ``durable=False`` and calls :meth:`sync` on the batch instead."""

    def __init__(self, root: Path | str, durable: bool = True) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.location = str(self.root)
        self.durable = durable
        self._buffers = threading.local()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _read(self, key: str, read: Callable[[BinaryIO], T]) -> T | None:
        """``read`` of the open object; None if there is no such object."""
        try:
            with open(self._path(key), "rb") as f:
                return read(f)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TierUnavailable(
                f"object store {self.location}: cannot read {key}: {exc}"
            ) from exc

    def get(self, key: str) -> bytes | None:
        return self._read(key, lambda f: f.read())

    def get_view(self, key: str) -> memoryview | None:
        return self._read(key, self._into_buffer)

    def _into_buffer(self, f: BinaryIO) -> memoryview:
        size = os.fstat(f.fileno()).st_size
        buffer = getattr(self._buffers, "buffer", None)
        if buffer is None or len(buffer) < size + 1:
            buffer = self._buffers.buffer = bytearray(max(size + 1, 1 << 20))
        view = memoryview(buffer)
        got = 0  # read one byte more than the size: a file that grew meanwhile shows
        while got < size + 1 and (n := f.readinto(view[got : size + 1])):
            got += n
        return view[:got]

    def head(self, key: str, n: int) -> bytes | None:
        return self._read(key, lambda f: f.read(n))

    def put(self, key: str, data: Data, durable: bool | None = None) -> None:
        """Write ``key`` atomically; ``durable`` (default: the store's) fsyncs it first."""
        durable = self.durable if durable is None else durable
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            try:
                try:
                    _write_all(fd, _parts(data))
                    if durable:
                        os.fsync(fd)
                    else:  # flushed later by sync(): get the disk started meanwhile
                        start_writeback(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            raise TierUnavailable(
                f"object store {self.location}: cannot write {key}: {exc}"
            ) from exc

    def sync(self, keys: Sequence[str]) -> None:
        """fsync each file, then each directory they are in (for the renames). Files
        flushed together let the disk write them in one go."""
        paths = [self._path(key) for key in keys]
        try:
            for path in [*paths, *sorted({p.parent for p in paths})]:
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise TierUnavailable(f"object store {self.location}: cannot flush: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise TierUnavailable(
                f"object store {self.location}: cannot delete {key}: {exc}"
            ) from exc

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        base = self.root / prefix
        if not base.is_dir():
            return
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith(".tmp-"):
                stat = path.stat()
                yield path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise TierUnavailable(f"object store {self.location} is not writable")


class S3ObjectStore:
    """S3 through a boto3 client. Build the client with short timeouts and no
    retries (:func:`make_s3_client`) so a dead endpoint costs one timeout; a request
    S3 answers with a 5xx is asked once more here (:meth:`_call`)."""

    def __init__(self, client, bucket: str, prefix: str = "") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.location = f"s3://{bucket}/{self.prefix}"

    def _fail(self, what: str, key: str, exc: Exception) -> StorageError:
        return s3_failure(exc, f"object store {self.location}", f"{what} {key}")

    def _call(self, what: str, key: str, request):
        """Run ``request()``, once more if S3 answered 5xx: S3 asks clients to retry
        an InternalError or SlowDown, and every request here is idempotent (a GET, a
        DELETE, a PUT of the same key and bytes). The server answered, so the second
        try costs no timeout; a frozen endpoint times out instead (no status) and is
        never retried. A missing key is ``None``."""
        for attempt in (1, 2):
            try:
                return request()
            except boto_errors() as exc:
                if s3_error_code(exc) in MISSING_KEY:
                    return None
                if attempt == 1 and s3_status(exc) >= 500:
                    continue
                raise self._fail(what, key, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, key: str, **extra) -> bytes | None:
        def request() -> bytes:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self.prefix + _check_key(key), **extra
            )
            return response["Body"].read()

        return self._call("GET", key, request)

    def get(self, key: str) -> bytes | None:
        return self._get(key)

    def get_view(self, key: str) -> memoryview | None:
        data = self._get(key)
        return None if data is None else memoryview(data)

    def head(self, key: str, n: int) -> bytes | None:
        return self._get(key, Range=f"bytes=0-{n - 1}")

    def put(self, key: str, data: Data, durable: bool | None = None) -> None:
        parts = _parts(data)
        body = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        full_key = self.prefix + _check_key(key)
        self._call(
            "PUT", key, lambda: self.client.put_object(Bucket=self.bucket, Key=full_key, Body=body)
        )

    def sync(self, keys: Sequence[str]) -> None:
        """Nothing to do: S3 answers a PUT once the object is durable."""

    def delete(self, key: str) -> None:
        full_key = self.prefix + _check_key(key)
        self._call(
            "DELETE", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=full_key)
        )

    def list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for obj in page.get("Contents", []):
                    yield (
                        obj["Key"][len(self.prefix) :],
                        obj["Size"],
                        obj["LastModified"].timestamp(),
                    )
        except boto_errors() as exc:
            raise self._fail("LIST", prefix, exc) from exc

    def ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except boto_errors() as exc:
            raise self._fail("HEAD bucket", "", exc) from exc


def make_s3_client(
    endpoint_url: str | None = None, timeout_s: float = 2.0, session=None, **client_kwargs
):
    """A boto3 S3 client whose every call is bounded by ``timeout_s``.

    One attempt (``total_max_attempts: 1``): a retry against an endpoint that just
    timed out doubles the wait; the tier's circuit breaker decides when to try again.
    (So a throttled or reset request fails at once too.) ``connect_timeout`` and
    ``read_timeout`` are both ``timeout_s``. The read timeout bounds each wait for
    bytes (the response headers, then each chunk of a body), not a whole transfer, so
    a large object that keeps arriving is not cut off. A PUT with a body first waits
    up to 1 s for "100 Continue" (botocore's fixed wait). An endpoint that stops
    answering, even one whose kernel still ACKs (a SIGSTOPped server), so costs
    ``timeout_s`` per GET and ``timeout_s`` + 1 s per PUT; it used to cost two attempts
    of at least 10 s each. ``session``: a boto3 Session with its own credentials
    (default: the environment's); ``client_kwargs`` go to ``session.client``.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    return (session or boto3).client(
        "s3", endpoint_url=endpoint_url, config=config, **client_kwargs
    )


def object_store_from_settings(settings, timeout_s: float = 2.0, client=None) -> ObjectStore:
    """The object store ESPER_* configures: an S3 bucket (through ``client``, else a
    bounded client of our own), or a directory under ESPER_HOME."""
    if settings.s3_bucket:
        client = client or make_s3_client(settings.aws_endpoint_url, timeout_s)
        return S3ObjectStore(client, settings.s3_bucket, settings.s3_prefix)
    return DirectoryObjectStore(settings.objects_dir)
