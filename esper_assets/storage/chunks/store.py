"""ChunkStore: content-addressed chunks written once to an object store
(``chunks/<first 2 hex>/<address>``, or ``archive/chunks/...`` once moved to the
archive prefix, where reads look second) and listed in a chunk index (PostgreSQL or
SQLite). An index row is inserted only after its object is durable, so the index
never names a missing object; a chunk the index lists is never written again.
Reads re-hash every chunk: what comes back is what was put, or an error."""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import NamedTuple

from esper_assets.errors import CorruptChunk, InvalidInput, MissingChunk
from esper_assets.storage.chunks import codec
from esper_assets.storage.chunks.content import FileRange, address_of, byte_view, check_address
from esper_assets.storage.chunks.gc import ChunkGcResult, collect_chunks
from esper_assets.storage.chunks.index import (
    ChunkIndex,
    PostgresChunkIndex,
    Row,
    SqliteChunkIndex,
)
from esper_assets.storage.objects import ObjectStore, object_store_from_settings

# Addresses per index query in missing() and touch(): under SQLite's parameter limit.
_QUERY_BATCH = 1000


class ChunkRef(NamedTuple):
    address: str
    size: int  # raw bytes
    stored_size: int  # bytes of the stored object
    new: bool  # this call stored it; False when it was already there


def object_key(address: str) -> str:
    return f"chunks/{address[:2]}/{address}"


def archive_key(address: str) -> str:
    """Where :meth:`ChunkStore.archive` moves a chunk (cold storage may serve the prefix)."""
    return f"archive/{object_key(address)}"


class ChunkStore:
    """Chunks by content address. Thread-safe: one store may serve many threads."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        postgres_url: str | None = None,
        sqlite_path: str | None = None,
        level: int = 1,
        timeout_s: float = 3.0,
    ) -> None:
        if (postgres_url is None) == (sqlite_path is None):
            raise InvalidInput("ChunkStore takes exactly one of postgres_url and sqlite_path")
        if not isinstance(level, int) or isinstance(level, bool) or not -7 <= level <= 22:
            raise InvalidInput(f"zstd level must be an int in [-7, 22], not {level!r}")
        self.objects = store
        self.level = level
        self.index: ChunkIndex = (
            PostgresChunkIndex(postgres_url, timeout_s)
            if postgres_url is not None
            else SqliteChunkIndex(sqlite_path, timeout_s)  # type: ignore[arg-type]
        )

    @classmethod
    def from_settings(cls, settings, store: ObjectStore | None = None) -> ChunkStore:
        """The chunk store ESPER_* configures: its database and object store."""
        store = store if store is not None else object_store_from_settings(settings)
        if settings.database_url:
            return cls(store, postgres_url=settings.database_url)
        return cls(store, sqlite_path=str(settings.sqlite_path))

    @property
    def location(self) -> str:
        """Where the chunks live, safe to print (no password)."""
        return f"{self.objects.location} (index {self.index.location})"

    # -- writes ---------------------------------------------------------------------------
    def put(self, data: bytes | memoryview | FileRange) -> ChunkRef:
        """Store ``data`` once under its address; idempotent."""
        return self.put_many([data], workers=1)[0]

    def put_many(
        self, chunks: Iterable[bytes | memoryview | FileRange], workers: int = 4
    ) -> list[ChunkRef]:
        """Store each chunk once; refs in input order.

        One of ``workers`` threads hashes, looks up (a read: workers do not queue for
        the database's write lock) and, if the index does not list it, writes each
        chunk, at most 2 * workers at a time, so an unbounded iterable is never held
        in memory at once. A chunk repeated in the input is written once. Then, in
        one go: the objects written are made durable together (one flush, not one
        per object: on a small VM disk a flush per 1 MiB object cost 5x the save) and
        only then indexed, so the index never names an object a power cut could
        lose; and the chunks found listed are touched, so garbage collection spares
        them for its grace period. One that it deleted in between (unreferenced and
        untouched for the whole grace) is written again from its source, which the
        caller still holds. On a failure, what was written is still flushed and
        indexed, then the first error is raised."""
        workers = _check_workers(workers)
        checked = (_checked_chunk(c) for c in chunks)
        batch = _Batch()
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="chunk-put") as executor:
                put = functools.partial(self._put_one, batch=batch)
                refs = list(_in_order(executor, put, checked, 2 * workers))
        finally:
            inserted = self._commit(batch)
        seen: set[str] = set()  # "new" goes to the first ref of each address inserted
        marked = []
        for ref in refs:
            marked.append(ref._replace(new=ref.address in inserted and ref.address not in seen))
            seen.add(ref.address)
        return marked

    def _put_one(self, chunk: bytes | memoryview | FileRange, batch: _Batch) -> ChunkRef:
        """Hash, then ask the index; write the object only if it is not listed (its
        ref says ``new``; :meth:`_commit` indexes it)."""
        data = _read_range(chunk) if isinstance(chunk, FileRange) else chunk
        address = address_of(data)
        first = batch.claim(address)
        if first is not None:  # the same bytes earlier in this call
            return first.result()._replace(new=False)
        try:
            listed = self.index.listed([address])
            if address in listed:
                batch.found.append((address, chunk))
                ref = ChunkRef(address, len(data), listed[address], False)
            else:
                stored = self._write_object(address, data)
                batch.written.append(Row(address, len(data), stored))
                ref = ChunkRef(address, len(data), stored, True)
        except BaseException as exc:
            batch.settle(address, exc)
            raise
        batch.settle(address, ref)
        return ref

    def _commit(self, batch: _Batch) -> set[str]:
        """Flush and index the objects written; touch the chunks found listed, and
        write again those garbage collection deleted meanwhile. The addresses this
        call inserted (another process may have stored one first)."""
        inserted = self._flush_and_index(batch.written)
        gone = self.touch(address for address, _ in batch.found)
        if gone:
            again = {a: chunk for a, chunk in batch.found if a in gone}
            rows = [self._write_again(a, chunk) for a, chunk in again.items()]
            inserted |= self._flush_and_index(rows)
        return inserted

    def _flush_and_index(self, rows: list[Row]) -> set[str]:
        if not rows:
            return set()
        self.objects.sync([object_key(row.address) for row in rows])
        inserted: set[str] = set()
        for start in range(0, len(rows), _QUERY_BATCH):
            inserted |= self.index.add(rows[start : start + _QUERY_BATCH])
        return inserted

    def _write_again(self, address: str, chunk: bytes | memoryview | FileRange) -> Row:
        data = _read_range(chunk) if isinstance(chunk, FileRange) else chunk
        if address_of(data) != address:
            raise InvalidInput(
                f"chunk {address} no longer reads the same from its source: it changed "
                "while it was being stored"
            )
        return Row(address, len(data), self._write_object(address, data))

    def _write_object(self, address: str, data: bytes | memoryview) -> int:
        parts = codec.encode(data, self.level)
        self.objects.put(object_key(address), parts, durable=False)  # see _commit
        return sum(len(p) for p in parts)

    # -- reads ----------------------------------------------------------------------------
    def get(self, address: str) -> bytes:
        """The raw bytes of a chunk, re-hashed. MissingChunk / CorruptChunk / InvalidInput."""
        data = self._fetch(address)
        return data if isinstance(data, bytes) else bytes(data)

    def _fetch(self, address: str) -> bytes | memoryview:
        """The chunk's verified bytes, perhaps a view into this thread's read buffer
        (valid until its next read)."""
        key = object_key(check_address(address))
        blob = self.objects.get_view(key)
        if blob is None:  # archived? (archive copies first, then deletes: one is there)
            blob = self.objects.get_view(archive_key(address))
            key = archive_key(address) if blob is not None else key
        if blob is None:
            raise MissingChunk(
                f"chunk {address} is not in the object store {self.objects.location} "
                f"(key {key}): a checkpoint naming it cannot be restored; restore another "
                "checkpoint, or save this one again from its source"
            )
        try:
            data = codec.decode(blob)
        except codec.DecodeError as exc:
            raise self._corrupt(address, key, str(exc)) from None
        if address_of(data) != address:
            raise self._corrupt(address, key, "its bytes do not hash to its address")
        return data

    def _corrupt(self, address: str, key: str, what: str) -> CorruptChunk:
        return CorruptChunk(
            f"chunk {address} in the object store {self.objects.location} (key {key}) is "
            f"corrupt: {what}. Nothing was restored from it; restore another checkpoint, "
            "or discard the chunk (ChunkStore.discard) and save again from the source to "
            "store it anew"
        )

    def read_many(
        self,
        addresses: Iterable[str],
        deliver: Callable[[int, bytes | memoryview], None],
        workers: int = 4,
    ) -> Iterator[int]:
        """Fetch and verify the chunks in parallel; each worker hands the i-th chunk to
        ``deliver(i, data)`` itself (``data`` is valid only during the call: write or
        copy it there). Yields each i in order once delivered; at most 2 * workers
        chunks are in flight. The first error stops the rest and is raised."""
        workers = _check_workers(workers)

        def fetch_and_deliver(item: tuple[int, str]) -> int:
            deliver(item[0], self._fetch(item[1]))
            return item[0]

        with ThreadPoolExecutor(workers, thread_name_prefix="chunk-get") as executor:
            yield from _in_order(executor, fetch_and_deliver, enumerate(addresses), 2 * workers)

    def get_many(self, addresses: Iterable[str], workers: int = 4) -> Iterator[bytes]:
        """The chunks' bytes in order, fetched in parallel (:meth:`read_many`, with a
        copy of each chunk kept until its turn)."""
        fetched: dict[int, bytes] = {}

        def keep(i: int, data: bytes | memoryview) -> None:
            fetched[i] = data if isinstance(data, bytes) else bytes(data)

        for i in self.read_many(addresses, keep, workers):
            yield fetched.pop(i)

    def verify(self, address: str) -> None:
        """Raise as :meth:`get` would; return nothing when the chunk is sound."""
        self._fetch(address)

    def missing(self, addresses: Iterable[str]) -> set[str]:
        """Those of ``addresses`` the index does not list."""
        return self._not_answered(addresses, self.index.listed)

    def touch(self, addresses: Iterable[str]) -> set[str]:
        """Mark the chunks as just used (garbage collection spares them for its grace
        period); return those the index no longer lists."""
        return self._not_answered(addresses, self.index.touch)

    @staticmethod
    def _not_answered(addresses: Iterable[str], ask: Callable[[list[str]], dict]) -> set[str]:
        """Those of ``addresses`` that ``ask`` (an index query, one batch at a time:
        databases bound a statement's parameters) leaves out of its answer."""
        wanted = sorted({check_address(a) for a in addresses})
        absent: set[str] = set()
        for start in range(0, len(wanted), _QUERY_BATCH):
            batch = wanted[start : start + _QUERY_BATCH]
            absent.update(set(batch) - ask(batch).keys())
        return absent

    def discard(self, address: str) -> bool:
        """Forget a chunk: its index row first, then its object (so the index never
        names a missing object). For a damaged chunk: the next put of its bytes stores
        it anew. Whether the index listed it."""
        listed = self.index.remove(check_address(address))
        self.delete_objects(address)
        return listed

    def delete_objects(self, address: str) -> None:
        """Both places a chunk's object may be (garbage collection, discard)."""
        self.objects.delete(object_key(address))
        self.objects.delete(archive_key(address))

    def archive(self, addresses: Iterable[str]) -> tuple[int, int]:
        """Move the chunks' objects under ``archive/`` (copy, then delete the original,
        so a read finds one or the other at every moment); they stay readable and the
        index is unchanged. (chunks moved, stored bytes moved); idempotent."""
        moved = moved_bytes = 0
        for address in sorted({check_address(a) for a in addresses}):
            blob = self.objects.get(object_key(address))
            if blob is None:  # already archived (or gone)
                continue
            self.objects.put(archive_key(address), blob)
            self.objects.delete(object_key(address))
            moved, moved_bytes = moved + 1, moved_bytes + len(blob)
        return moved, moved_bytes

    def collect_garbage(
        self, live: Collection[str], grace: timedelta, dry_run: bool = False
    ) -> ChunkGcResult:
        """Delete the chunks not in ``live`` untouched for ``grace`` (see ``gc``)."""
        return collect_chunks(self, live, grace, dry_run)

    def stats(self) -> dict:
        chunks, logical, stored = self.index.totals()
        return {"chunks": chunks, "logical_bytes": logical, "stored_bytes": stored}

    def close(self) -> None:
        self.index.close()

    def __enter__(self) -> ChunkStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Batch:
    """One put_many call's bookkeeping: the first chunk of each address stores it
    (the repeats wait for its ref), and the rows of the objects it wrote."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._first: dict[str, Future] = {}
        self.written: list[Row] = []  # list.append is atomic: workers append at once
        self.found: list[tuple[str, object]] = []  # (address, chunk) listed already

    def claim(self, address: str) -> Future | None:
        """None for the first claim of ``address`` (store it, then settle); the first
        claimant's future for the others."""
        with self._lock:
            if address in self._first:
                return self._first[address]
            self._first[address] = Future()
            return None

    def settle(self, address: str, outcome: ChunkRef | BaseException) -> None:
        future = self._first[address]
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


_reads = threading.local()  # each worker's buffer for the file ranges it reads


def _read_range(chunk: FileRange) -> memoryview:
    """The range's bytes in this thread's reusable buffer (a fresh 4 MiB buffer per
    chunk costs more in page faults than hashing it)."""
    buffer = getattr(_reads, "buffer", None)
    if buffer is None or len(buffer) < chunk.length:
        buffer = _reads.buffer = bytearray(max(chunk.length, 1 << 20))
    view = memoryview(buffer)[: chunk.length]
    got = 0
    while got < chunk.length and (n := os.preadv(chunk.fd, [view[got:]], chunk.offset + got)):
        got += n
    if got < chunk.length:
        raise InvalidInput(
            f"only {got} of {chunk.length} bytes could be read at offset {chunk.offset}: "
            "the file is shorter than it was (it changed while it was read)"
        )
    return view


def _checked_chunk(chunk: object) -> bytes | memoryview | FileRange:
    if isinstance(chunk, FileRange):
        if not 0 <= chunk.length <= codec.MAX_CHUNK_BYTES:
            raise InvalidInput(
                f"a chunk holds at most {codec.MAX_CHUNK_BYTES} bytes, not {chunk.length}"
            )
        return chunk
    return _as_bytes(chunk)


def _in_order(executor: ThreadPoolExecutor, fn: Callable, items: Iterable, depth: int) -> Iterator:
    """``fn(item)`` for each item on ``executor``, at most ``depth`` at a time; the
    results in input order. On an error, what has not started is cancelled."""
    source = iter(items)
    pending: deque[Future] = deque(executor.submit(fn, i) for i in itertools.islice(source, depth))
    try:
        while pending:
            result = pending.popleft().result()
            pending.extend(executor.submit(fn, i) for i in itertools.islice(source, 1))
            yield result
    finally:
        for future in pending:
            future.cancel()


def _as_bytes(data: object) -> bytes | memoryview:
    if isinstance(data, bytes):
        view = data
    elif isinstance(data, bytearray | memoryview):
        view = byte_view(data)
    else:
        raise InvalidInput(f"a chunk is bytes or a memoryview, not {type(data).__name__}")
    if len(view) > codec.MAX_CHUNK_BYTES:
        raise InvalidInput(
            f"a chunk holds at most {codec.MAX_CHUNK_BYTES} bytes, not {len(view)}: "
            "cut larger content with split_content first"
        )
    return view


def _check_workers(workers: object) -> int:
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= 64:
        raise InvalidInput(f"workers must be an int in [1, 64], not {workers!r}")
    return workers
