"""ChunkStore on both backends (SQLite + directory; PostgreSQL + moto S3).

Round trips (random and compressible bytes, numpy views, put_many/get_many in
order); write-once dedup (one object, ``new`` only the first time, also for two
threads racing on one chunk and for repeats inside one batch); the index never
names an object that did not land (a failing object store); bounded windows
(put_many and get_many pull at most 2 * workers items ahead); every kind of damage
to a stored object is CorruptChunk naming the address, a deleted one MissingChunk;
malformed addresses and chunks are InvalidInput; missing(), stats(), from_settings.
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zstandard

from esper_assets.errors import CorruptChunk, InvalidInput, MissingChunk, TierUnavailable
from esper_assets.settings import Settings
from esper_assets.storage.chunks import (
    ChunkRef,
    ChunkStore,
    address_of,
    codec,
    object_key,
    split_content,
)
from esper_assets.storage.objects import DirectoryObjectStore
from esper_assets_tests.conftest import closed_port
from esper_assets_tests.storage.chunks.conftest import stored_keys


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def compressible(n: int, seed: int = 0) -> bytes:
    words = [b"tensor", b"kernel", b"seed", b"blueprint", b"\x00\x00\x00\x00"]
    rng = random.Random(seed)
    return b"".join(rng.choice(words) for _ in range(n // 4 + 1))[:n]


class Spy:
    """An ObjectStore in front of another: counts puts, can fail or wait in them."""

    def __init__(
        self, inner, fail_for: set[str] = frozenset(), barrier=None, fail_sync: bool = False
    ) -> None:
        self.inner = inner
        self.location = inner.location
        self.fail_for = fail_for
        self.barrier = barrier
        self.fail_sync = fail_sync
        self.puts: list[str] = []
        self.synced: list[str] = []
        self.lock = threading.Lock()

    def put(self, key: str, data, durable=None) -> None:
        with self.lock:
            self.puts.append(key)
        if self.barrier is not None:
            self.barrier.wait()  # both writers have looked in the index by now
        if key in self.fail_for:
            raise TierUnavailable(f"object store {self.location}: the test refuses {key}")
        self.inner.put(key, data, durable)

    def sync(self, keys) -> None:
        if self.fail_sync:
            raise TierUnavailable(f"object store {self.location}: the test refuses to flush")
        self.synced.extend(keys)
        self.inner.sync(keys)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


# -- round trips ----------------------------------------------------------------------------
@pytest.mark.parametrize("make", [random_bytes, compressible], ids=["random", "compressible"])
@pytest.mark.parametrize("size", [0, 1, 5000, 300_000])
def test_round_trip(chunks, make, size):
    data = make(size)
    ref = chunks.put(data)
    assert ref == ChunkRef(address_of(data), size, ref.stored_size, True)
    assert chunks.get(ref.address) == data
    chunks.verify(ref.address)


def test_compressible_chunks_are_stored_smaller_and_random_ones_raw(chunks, raw_store):
    text, noise = compressible(100_000), random_bytes(100_000)
    small, raw = chunks.put(text), chunks.put(noise)
    assert small.stored_size < len(text) // 2
    assert raw.stored_size == len(noise) + 1  # codec byte + the bytes as they are
    assert raw_store.get(object_key(raw.address)) == codec.RAW + noise


def test_numpy_arrays_are_stored_as_their_bytes(chunks):
    array = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    ref = chunks.put(memoryview(array))
    assert ref.address == address_of(array.tobytes()) and ref.size == array.nbytes
    assert chunks.get(ref.address) == array.tobytes()


def test_put_many_and_get_many_keep_input_order(chunks):
    pieces = [random_bytes(1000 + i, seed=i % 7) for i in range(40)]  # repeats 7 contents
    refs = chunks.put_many(iter(pieces), workers=3)
    assert [r.address for r in refs] == [address_of(p) for p in pieces]
    assert [r.size for r in refs] == [len(p) for p in pieces]
    assert list(chunks.get_many((r.address for r in refs), workers=3)) == pieces


def test_a_split_file_round_trips_through_put_many(chunks):
    data = compressible(400_000) + random_bytes(400_000)
    refs = chunks.put_many(split_content(data, 8192), workers=4)
    assert b"".join(chunks.get_many(r.address for r in refs)) == data
    assert sum(r.size for r in refs) == len(data)


# -- write once -------------------------------------------------------------------------------
def test_the_same_bytes_twice_make_one_object(chunks, make_chunks, raw_store):
    data = compressible(50_000)
    first, second = chunks.put(data), chunks.put(data)
    assert first.new and not second.new
    assert first._replace(new=False) == second
    assert stored_keys(raw_store) == [object_key(first.address)]
    again = make_chunks().put(data)  # another store on the same index: shares no memory
    assert not again.new
    assert chunks.stats() == {
        "chunks": 1,
        "logical_bytes": 50_000,
        "stored_bytes": first.stored_size,
    }


def test_repeats_in_one_batch_are_written_once(chunks, make_chunks, raw_store):
    spy = Spy(raw_store)
    data = [b"a" * 3000, b"b" * 3000, b"a" * 3000, b"a" * 3000]
    refs = make_chunks(spy).put_many(data, workers=4)  # all four in flight at once
    assert [r.address for r in refs].count(refs[0].address) == 3
    assert sum(r.new for r in refs if r.address == refs[0].address) == 1
    assert refs[1].new and len(spy.puts) == 2
    assert [r.new for r in chunks.put_many(data)] == [False] * 4
    assert len(stored_keys(raw_store)) == 2


def test_a_known_chunk_is_not_written_again(chunks, make_chunks, raw_store):
    ref = chunks.put(random_bytes(5000))
    spy = Spy(raw_store)
    assert not make_chunks(spy).put(random_bytes(5000)).new
    assert spy.puts == []
    assert chunks.get(ref.address) == random_bytes(5000)


def test_two_threads_putting_the_same_chunk(make_chunks, raw_store):
    data = compressible(200_000, seed=4)
    spy = Spy(raw_store, barrier=threading.Barrier(2, timeout=30))
    store = make_chunks(spy)
    with ThreadPoolExecutor(2) as pool:
        refs = list(pool.map(lambda _: store.put(data), range(2)))
    assert len(spy.puts) == 2  # both looked before either wrote: both wrote
    assert sorted(r.new for r in refs) == [False, True]  # one row, one "new"
    assert stored_keys(raw_store) == [object_key(address_of(data))]
    assert store.get(refs[0].address) == data
    assert store.stats()["chunks"] == 1


# -- the index never names a missing object ---------------------------------------------------
def test_objects_are_flushed_before_they_are_indexed(make_chunks, raw_store):
    spy = Spy(raw_store)
    refs = make_chunks(spy).put_many([random_bytes(4000, i) for i in range(5)])
    assert sorted(spy.synced) == sorted(object_key(r.address) for r in refs)
    failing = Spy(raw_store, fail_sync=True)
    with pytest.raises(TierUnavailable, match="flush"):
        make_chunks(failing).put_many([random_bytes(4000, 9)])
    assert make_chunks().missing([address_of(random_bytes(4000, 9))]) == {
        address_of(random_bytes(4000, 9))
    }  # written, never flushed: not indexed, so the next save writes it again


def test_a_failed_object_write_leaves_no_index_row(make_chunks, raw_store):
    good, bad = random_bytes(4000, 1), random_bytes(4000, 2)
    spy = Spy(raw_store, fail_for={object_key(address_of(bad))})
    store = make_chunks(spy)
    with pytest.raises(TierUnavailable, match="refuses"):
        store.put_many([good, bad, good])
    assert store.missing([address_of(good), address_of(bad)]) == {address_of(bad)}
    healthy = make_chunks()
    assert healthy.put(bad).new and not healthy.put(good).new
    assert healthy.get(address_of(bad)) == bad


# -- bounded windows --------------------------------------------------------------------------
def test_put_many_pulls_one_window_at_a_time(make_chunks, raw_store):
    pulled = []
    spy = Spy(raw_store)
    first_put_at: list[int] = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield random_bytes(500, seed=i)

    original = spy.put

    def put(key, data, durable=None):
        if not first_put_at:
            first_put_at.append(len(pulled))
        original(key, data, durable)

    spy.put = put
    refs = make_chunks(spy).put_many(source(), workers=2)
    assert len(refs) == 100 and first_put_at[0] <= 4  # 2 * workers items ahead, not 100


def test_get_many_fetches_a_bounded_window_ahead(chunks):
    refs = chunks.put_many([random_bytes(300, seed=i) for i in range(30)])
    pulled = []

    def addresses():
        for ref in refs:
            pulled.append(ref.address)
            yield ref.address

    results = chunks.get_many(addresses(), workers=2)
    assert next(results) == random_bytes(300, seed=0)
    assert len(pulled) <= 2 * 2 + 1
    assert list(results) == [random_bytes(300, seed=i) for i in range(1, 30)]


# -- damage ---------------------------------------------------------------------------------
def flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x40]) + blob[at + 1 :]


DAMAGE = {
    "flip_payload": lambda b: flip(b, len(b) // 2),
    "flip_last": lambda b: flip(b, len(b) - 1),
    "flip_codec": lambda b: flip(b, 0),
    "truncate": lambda b: b[: len(b) // 2],
    "one_byte": lambda b: b[:1],
    "empty": lambda b: b"",
    "garbage": lambda b: random_bytes(len(b), seed=99),
    "other_chunk": lambda b: codec.encode(b"some other chunk" * 100, 3),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("make", [random_bytes, compressible], ids=["raw", "zstd"])
def test_a_damaged_object_is_corrupt_chunk(chunks, raw_store, damage, make):
    ref = chunks.put(make(20_000, 7))
    key = object_key(ref.address)
    raw_store.put(key, DAMAGE[damage](raw_store.get(key)))
    for read in (chunks.get, chunks.verify, lambda a: list(chunks.get_many([a]))):
        with pytest.raises(CorruptChunk, match=ref.address) as caught:
            read(ref.address)
        assert raw_store.location in str(caught.value) and "restore another" in str(caught.value)


def test_a_frame_claiming_a_huge_size_is_refused_before_decompressing(
    chunks, raw_store, monkeypatch
):
    ref = chunks.put(compressible(20_000))
    monkeypatch.setattr(codec, "MAX_CHUNK_BYTES", 10_000)
    with pytest.raises(CorruptChunk, match="claims 20000 bytes"):
        chunks.get(ref.address)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 5000)
    raw_store.put(object_key(ref.address), codec.ZSTD + unsized)
    with pytest.raises(CorruptChunk, match=ref.address):
        chunks.get(ref.address)


def test_a_deleted_object_is_missing_chunk(chunks, raw_store):
    ref = chunks.put(random_bytes(1000))
    raw_store.delete(object_key(ref.address))
    for read in (chunks.get, chunks.verify):
        with pytest.raises(MissingChunk, match=ref.address) as caught:
            read(ref.address)
        assert raw_store.location in str(caught.value)
    absent = address_of(b"never stored")
    with pytest.raises(MissingChunk, match=absent):
        list(chunks.get_many([ref.address.replace(ref.address, absent)]))


# -- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "a" * 63, "A" * 64, "../" + "a" * 61, None, 12])
def test_malformed_addresses_are_invalid_input(chunks, bad):
    for call in (chunks.get, chunks.verify, lambda a: chunks.missing([a])):
        with pytest.raises(InvalidInput, match="chunk address"):
            call(bad)
    with pytest.raises(InvalidInput):
        list(chunks.get_many([bad]))


@pytest.mark.parametrize("bad", ["text", 42, None, [b"a"]])
def test_a_chunk_that_is_not_bytes_is_invalid_input(chunks, bad):
    with pytest.raises(InvalidInput, match="bytes or a memoryview"):
        chunks.put(bad)
    with pytest.raises(InvalidInput):
        chunks.put_many([b"fine", bad])


def test_a_chunk_over_the_limit_is_invalid_input(chunks, monkeypatch):
    monkeypatch.setattr(codec, "MAX_CHUNK_BYTES", 1000)
    with pytest.raises(InvalidInput, match="split_content"):
        chunks.put(b"x" * 1001)
    assert chunks.stats()["chunks"] == 0


@pytest.mark.parametrize("workers", [0, -1, 65, 2.0, True])
def test_bad_worker_counts_are_invalid_input(chunks, workers):
    with pytest.raises(InvalidInput, match="workers"):
        chunks.put_many([b"a"], workers=workers)
    with pytest.raises(InvalidInput, match="workers"):
        list(chunks.get_many([address_of(b"a")], workers=workers))


@pytest.mark.parametrize("level", [23, -8, 3.0, "3", True])
def test_bad_zstd_levels_are_invalid_input(raw_store, tmp_path, level):
    with pytest.raises(InvalidInput, match="zstd level"):
        ChunkStore(raw_store, sqlite_path=str(tmp_path / "x.sqlite3"), level=level)


def test_other_levels_store_the_same_addresses(make_chunks):
    data = compressible(50_000)
    fast, strong = make_chunks(level=1).put(data), make_chunks(level=19).put(data)
    assert fast.address == strong.address and not strong.new


def test_exactly_one_database(raw_store, tmp_path):
    with pytest.raises(InvalidInput, match="exactly one"):
        ChunkStore(raw_store)
    with pytest.raises(InvalidInput, match="exactly one"):
        ChunkStore(raw_store, postgres_url="postgresql://x", sqlite_path=str(tmp_path / "x"))


# -- index queries ------------------------------------------------------------------------
def test_missing_names_what_the_index_does_not_list(chunks):
    stored = [r.address for r in chunks.put_many([b"one", b"two"])]
    absent = {address_of(b"three"), address_of(b"four")}
    assert chunks.missing([*stored, *absent, stored[0]]) == absent
    assert chunks.missing([]) == set()
    many = {address_of(str(i).encode()) for i in range(2500)}  # several index queries
    assert chunks.missing(many | set(stored)) == many


def test_stats_count_logical_and_stored_bytes(chunks):
    assert chunks.stats() == {"chunks": 0, "logical_bytes": 0, "stored_bytes": 0}
    refs = chunks.put_many([compressible(10_000), random_bytes(10_000), compressible(10_000)])
    assert chunks.stats() == {
        "chunks": 2,
        "logical_bytes": 20_000,
        "stored_bytes": refs[0].stored_size + refs[1].stored_size,
    }


def test_from_settings_opens_what_esper_variables_name(
    request, backend, esper_home, monkeypatch, raw_store
):
    """Embedded: the SQLite file and objects directory under ESPER_HOME. Services:
    ESPER_DATABASE_URL and the ESPER_S3_BUCKET bucket (prefix ``esper``, like
    ``raw_store``)."""
    if backend == "postgres":
        monkeypatch.setenv("ESPER_DATABASE_URL", request.getfixturevalue("pg_url"))
        monkeypatch.setenv("ESPER_S3_BUCKET", request.getfixturevalue("s3_bucket"))
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_endpoint"))
    settings = Settings.from_env()
    with ChunkStore.from_settings(settings) as store:
        ref = store.put(b"from settings")
        assert store.get(ref.address) == b"from settings"
        assert "password" not in store.location
    assert settings.sqlite_path.exists() == (backend == "sqlite")
    if backend == "sqlite":
        assert (settings.objects_dir / object_key(ref.address)).is_file()
    else:
        assert raw_store.get(object_key(ref.address)) is not None


# -- repair, races between batches, early stops, touch ------------------------------------------
def test_discard_lets_the_next_put_store_a_damaged_chunk_anew(chunks, raw_store):
    data = compressible(30_000, seed=8)
    ref = chunks.put(data)
    raw_store.put(object_key(ref.address), b"\x01garbage")
    with pytest.raises(CorruptChunk, match="ChunkStore.discard"):
        chunks.get(ref.address)
    assert not chunks.put(data).new  # still listed: put trusts the index
    assert chunks.discard(ref.address) is True
    assert chunks.missing([ref.address]) == {ref.address}
    assert chunks.put(data).new and chunks.get(ref.address) == data
    assert chunks.discard(address_of(b"never stored")) is False
    with pytest.raises(InvalidInput):
        chunks.discard("nope")


def test_overlapping_batches_in_opposite_orders_do_not_deadlock(make_chunks):
    pieces = [random_bytes(200, seed=i) for i in range(60)]
    stores = [make_chunks(), make_chunks()]
    orders = [pieces, pieces[::-1]]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: stores[i].put_many(orders[i], workers=8), range(2)))
    assert [r.address for r in results[0]] == [address_of(p) for p in pieces]
    new = sum(r.new for refs in results for r in refs)
    assert new == 60  # each chunk recorded once, by one of the two
    assert stores[0].stats()["chunks"] == 60


def test_get_many_can_be_abandoned_early(chunks):
    refs = chunks.put_many([random_bytes(100, seed=i) for i in range(20)])
    results = chunks.get_many((r.address for r in refs), workers=2)
    assert next(results) == random_bytes(100, seed=0)
    results.close()  # waits for the few fetches in flight, starts no more


def test_reusing_a_chunk_touches_it(chunks, index_rows, backend):
    """Garbage collection spares chunks touched within its grace period: a put that
    finds its chunk already stored must mark it as just used."""
    day = "86400" if backend == "sqlite" else "interval '1 day'"
    ref = chunks.put(b"used twice")
    index_rows(f"UPDATE checkpoint_chunks SET touched_at = created_at - {day}")
    assert not chunks.put(b"used twice").new and ref.new
    assert chunks.put_many([b"used twice"])[0].new is False
    assert [
        bool(r[0])
        for r in index_rows(f"SELECT touched_at > created_at - {day} FROM checkpoint_chunks")
    ] == [True]


def test_an_unreachable_database_is_tier_unavailable_without_the_password(tmp_path):
    url = f"postgresql://esper:s3cret-pw@127.0.0.1:{closed_port()}/nowhere"
    with pytest.raises(TierUnavailable) as caught:
        ChunkStore(DirectoryObjectStore(tmp_path), postgres_url=url, timeout_s=1.0)
    assert "s3cret-pw" not in str(caught.value) and "chunk index" in str(caught.value)
