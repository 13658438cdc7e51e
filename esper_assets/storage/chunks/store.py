"""ChunkStore: content-addressed chunks written once to an object store
(``chunks/<first 2 hex>/<address>``, or ``archive/chunks/...`` once moved to the
archive prefix, where reads look second) and listed in a chunk index (PostgreSQL or
SQLite). An index row is inserted only after its object is durable, so the index
never names a missing object; a chunk the index lists is never written again.
Reads re-hash every chunk: what comes back is what was put, or an error."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import NamedTuple

from esper_assets.errors import CorruptChunk, InvalidInput, MissingChunk
from esper_assets.storage.chunks import codec
from esper_assets.storage.chunks.content import address_of, byte_view, check_address
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
        level: int = 3,
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
    def put(self, data: bytes | memoryview) -> ChunkRef:
        """Store ``data`` once under its address; idempotent."""
        return self._put_window([_as_bytes(data)], executor=None)[0]

    def put_many(self, chunks: Iterable[bytes | memoryview], workers: int = 4) -> list[ChunkRef]:
        """Store each chunk once; refs in input order. Works in windows of
        2 * workers chunks (one index query each, objects written in parallel), so an
        unbounded iterable is never held in memory at once."""
        workers = _check_workers(workers)
        refs: list[ChunkRef] = []
        source = iter(chunks)
        with ThreadPoolExecutor(workers, thread_name_prefix="chunk-put") as executor:
            while window := [_as_bytes(c) for c in itertools.islice(source, 2 * workers)]:
                refs.extend(self._put_window(window, executor))
        return refs

    def _put_window(self, window: list, executor: ThreadPoolExecutor | None) -> list[ChunkRef]:
        """Hash the window's chunks, ask the index once which it lists, write the
        others' objects, then (only then) record them in the index."""
        run = executor.map if executor is not None else map
        addresses = list(run(address_of, window))
        known = self.index.touch(sorted(set(addresses)))
        # The first occurrence of each unknown address is written; repeats reuse it.
        todo = {a: data for a, data in zip(addresses, window, strict=True) if a not in known}
        written, failure = self._write_objects(todo, executor)
        inserted = self.index.add([Row(a, len(todo[a]), stored) for a, stored in written.items()])
        if failure is not None:
            raise failure  # after indexing what did land: nothing written is lost
        sizes = known | written
        refs, seen = [], set()
        for address, data in zip(addresses, window, strict=True):
            new = address in inserted and address not in seen
            seen.add(address)
            refs.append(ChunkRef(address, len(data), sizes[address], new))
        return refs

    def _write_objects(
        self, todo: dict, executor: ThreadPoolExecutor | None
    ) -> tuple[dict[str, int], Exception | None]:
        """Encode and write each chunk; ({address: stored size} of those written, the
        first failure or None)."""
        if executor is None:
            futures = {a: _done(self._write_object, a, d) for a, d in todo.items()}
        else:
            futures = {a: executor.submit(self._write_object, a, d) for a, d in todo.items()}
        written, failure = {}, None
        for address, future in futures.items():
            try:
                written[address] = future.result()
            except Exception as exc:
                failure = failure or exc
        return written, failure

    def _write_object(self, address: str, data: bytes | memoryview) -> int:
        blob = codec.encode(data, self.level)
        self.objects.put(object_key(address), blob)
        return len(blob)

    # -- reads ----------------------------------------------------------------------------
    def get(self, address: str) -> bytes:
        """The raw bytes of a chunk, re-hashed. MissingChunk / CorruptChunk / InvalidInput."""
        key = object_key(check_address(address))
        blob = self.objects.get(key)
        if blob is None:  # archived? (archive copies first, then deletes: one is there)
            blob = self.objects.get(archive_key(address))
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

    def get_many(self, addresses: Iterable[str], workers: int = 4) -> Iterator[bytes]:
        """The chunks in order, fetched in parallel; at most 2 * workers in memory."""
        workers = _check_workers(workers)
        source = iter(addresses)
        with ThreadPoolExecutor(workers, thread_name_prefix="chunk-get") as executor:
            pending: deque[Future] = deque()
            for address in itertools.islice(source, 2 * workers):
                pending.append(executor.submit(self.get, address))
            while pending:
                data = pending.popleft().result()
                for address in itertools.islice(source, 1):
                    pending.append(executor.submit(self.get, address))
                yield data
                # A consumer that stops early leaves the rest to the executor's exit.

    def verify(self, address: str) -> None:
        """Raise as :meth:`get` would; return nothing when the chunk is sound."""
        self.get(address)

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


def _done(fn, *args) -> Future:
    """``fn(*args)`` as a finished Future (its result or its exception)."""
    future: Future = Future()
    try:
        future.set_result(fn(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future
