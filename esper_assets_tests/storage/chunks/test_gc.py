"""ChunkStore.collect_garbage on both backends: only unreferenced chunks untouched for
the grace period go, index row and object together; a touch since the listing wins;
a failed object delete leaves the row; dry runs and second runs change nothing."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from esper_assets.errors import InvalidInput, TierUnavailable
from esper_assets.storage.chunks import archive_key, object_key
from esper_assets_tests.storage.chunks.conftest import stored_keys

HOUR = timedelta(hours=1)


@pytest.fixture
def age(index_rows, backend):
    """``age(address)``: make the chunk look last touched two hours ago."""

    def make_old(address: str) -> None:
        shift = "7200" if backend == "sqlite" else "interval '2 hours'"
        index_rows(
            f"UPDATE checkpoint_chunks SET touched_at = touched_at - {shift} "
            f"WHERE address = '{address}'"
        )

    return make_old


def test_only_old_unreferenced_chunks_go(chunks, raw_store, age):
    live, dead, fresh = (chunks.put(b"live" * 100), chunks.put(b"dead" * 100),
                         chunks.put(b"fresh" * 100))  # fmt: skip
    age(live.address)
    age(dead.address)
    result = chunks.collect_garbage({live.address}, HOUR)
    assert result.deleted == [dead.address]
    assert result.bytes_freed == dead.stored_size
    assert (result.kept, result.in_grace) == (2, 1)  # fresh: unreferenced, but in grace
    assert stored_keys(raw_store) == sorted([object_key(live.address), object_key(fresh.address)])
    assert chunks.missing([live.address, dead.address, fresh.address]) == {dead.address}


def test_dry_run_and_second_run_change_nothing(chunks, raw_store, age):
    dead = chunks.put(b"dead" * 100)
    age(dead.address)
    dry = chunks.collect_garbage(set(), HOUR, dry_run=True)
    assert dry.deleted == [dead.address] and dry.bytes_freed == dead.stored_size
    assert stored_keys(raw_store) == [object_key(dead.address)]
    assert chunks.collect_garbage(set(), HOUR).deleted == [dead.address]
    again = chunks.collect_garbage(set(), HOUR)
    assert (again.deleted, again.bytes_freed, again.kept) == ([], 0, 0)


def test_a_collected_chunk_is_stored_anew_by_the_next_put(chunks, age):
    ref = chunks.put(b"comes back" * 100)
    age(ref.address)
    chunks.collect_garbage(set(), HOUR)
    assert chunks.put(b"comes back" * 100).new
    assert chunks.get(ref.address) == b"comes back" * 100


def test_a_touch_after_the_listing_wins(chunks, age):
    """remove_stale re-checks touched_at in its DELETE: a save that reused the chunk
    since garbage collection listed it keeps it."""
    ref = chunks.put(b"reused" * 100)
    age(ref.address)
    assert [old for _, _, old in chunks.index.ages(3600)] == [True]
    chunks.put(b"reused" * 100)  # a save reuses it: touched now
    called = []
    assert chunks.index.remove_stale(ref.address, 3600, lambda: called.append(1)) is None
    assert called == [] and chunks.get(ref.address) == b"reused" * 100


def test_a_failed_object_delete_keeps_the_row(make_chunks, raw_store, age):
    class NoDelete:
        def __init__(self, inner):
            self.inner, self.location = inner, inner.location

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def delete(self, key):
            raise TierUnavailable("object store down")

    chunks = make_chunks(store=NoDelete(raw_store))
    ref = chunks.put(b"stays" * 100)
    age(ref.address)
    with pytest.raises(TierUnavailable):
        chunks.collect_garbage(set(), HOUR)
    assert chunks.missing([ref.address]) == set()  # the DELETE was rolled back
    assert chunks.get(ref.address) == b"stays" * 100


@pytest.mark.parametrize("grace", [timedelta(seconds=-1), 3600, None])
def test_a_bad_grace_is_refused(chunks, grace):
    with pytest.raises(InvalidInput, match="grace"):
        chunks.collect_garbage(set(), grace)


def test_a_put_racing_the_delete_ends_with_row_and_object(make_chunks, age):
    """A save putting the chunk while gc deletes it waits for gc's transaction (row
    lock on PostgreSQL, write lock on SQLite), then finds no row and writes the object
    again: whatever the interleaving, the index never names a missing object."""
    gc_side, saver = make_chunks(), make_chunks()
    data = b"raced" * 100
    ref = gc_side.put(data)
    age(ref.address)
    results = []
    racing = threading.Thread(target=lambda: results.append(saver.put(data)))

    def delete_object() -> None:
        racing.start()
        time.sleep(0.2)  # let the put reach the lock (the outcome holds either way)
        gc_side.objects.delete(object_key(ref.address))

    assert gc_side.index.remove_stale(ref.address, 3600, delete_object) is not None
    racing.join()
    assert results[0].new  # it started after the DELETE: it found no row, stored anew
    assert saver.missing([ref.address]) == set()
    assert saver.get(ref.address) == data


def test_archive_moves_objects_and_reads_still_find_them(chunks, raw_store, age):
    cold, hot = chunks.put(b"cold" * 100), chunks.put(b"hot" * 100)
    assert chunks.archive([cold.address]) == (1, cold.stored_size)
    assert chunks.archive([cold.address]) == (0, 0)  # idempotent
    assert stored_keys(raw_store) == [object_key(hot.address)]
    assert [k for k, _, _ in raw_store.list("archive/")] == [archive_key(cold.address)]
    assert chunks.get(cold.address) == b"cold" * 100 and not chunks.put(b"cold" * 100).new
    age(cold.address)
    assert chunks.collect_garbage({hot.address}, HOUR).deleted == [cold.address]
    assert list(raw_store.list("archive/")) == []
