"""Access-count flushes from many repositories at once (issue 8, hardening).

Each AssetRepository batches reads in memory and flushes them as one transaction.
Several processes flushing overlapping ids used to lock the rows in whatever order
their reads happened, and deadlocked each other now and then (PostgreSQL aborts one
of them: "deadlock detected"). Flushes now lock their rows in asset_id order first.

The race test runs several repositories - each with its own connections - in
threads (psycopg releases the GIL while it waits on the server, so the transactions
really overlap) that read overlapping id sets in opposite orders and flush at the
same moment, round after round. ``deadlock_timeout`` is lowered for these sessions
only, so a deadlock, if one happens, is reported in milliseconds rather than after
a second; it does not change whether one happens.

Also: an invalid id in the pending counts (NUL byte, unprintable, not a string...)
is dropped and counted, and never makes the whole flush fail.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from esper_assets.errors import StorageError
from esper_assets.storage.repository import AssetMetadata, AssetQuery, AssetRepository
from esper_assets_tests.conftest import ASSET_BACKENDS, wait_until, with_pg_options
from esper_assets_tests.storage.repository.conftest import (
    REPO_OPTIONS,
    THRESHOLD,
    blob,
    is_utc,
    meta,
)

WORKERS = 4
IDS = 48
ROUNDS = 30
NO_PERIODIC_FLUSH = {"access_flush_interval_s": 3600.0}


def make_assets(repo: AssetRepository, n: int) -> list[str]:
    items = [
        (AssetMetadata(asset_type="kernel", name=f"hot-{i}"), f"data {i}".encode())
        for i in range(n)
    ]
    return repo.bulk_create(items)


def counts(repo: AssetRepository) -> dict[str, int]:
    found = repo.search_assets(AssetQuery().include_expired().limit(10_000))
    return {m.asset_id: m.access_count for m in found}


@pytest.fixture
def pg_repos(pg_url):
    """Open repositories on this test's schema; all closed before the schema goes."""
    url = with_pg_options(pg_url, "-cdeadlock_timeout=10ms")
    opened: list[AssetRepository] = []

    def open_repo() -> AssetRepository:
        repo = AssetRepository(postgres_url=url, **NO_PERIODIC_FLUSH)
        opened.append(repo)
        return repo

    yield open_repo
    for repo in opened:
        repo.close()


def test_concurrent_flushes_in_opposite_orders_never_deadlock(pg_repos):
    ids = make_assets(pg_repos(), IDS)
    repos = [pg_repos() for _ in range(WORKERS)]
    start_flush = threading.Barrier(WORKERS, timeout=120)  # guards against a hang only
    errors: list[BaseException] = []
    expected = dict.fromkeys(ids, 0)
    plans = []
    for w in range(WORKERS):
        # Overlapping sets: each worker leaves out a different quarter of the ids.
        mine = [aid for k, aid in enumerate(ids) if k % WORKERS != w]
        plans.append(mine if w % 2 == 0 else mine[::-1])  # opposite read orders
        for aid in mine:
            expected[aid] += ROUNDS

    def work(repo: AssetRepository, plan: list[str]) -> None:
        for _ in range(ROUNDS):
            for aid in plan:
                repo.get_asset(aid)
            try:
                start_flush.wait()
            except threading.BrokenBarrierError:
                return
            try:
                repo.flush_access()
            except StorageError as exc:  # a deadlock surfaces here
                errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(repo, plan), name=f"flusher-{w}")
        for w, (repo, plan) in enumerate(zip(repos, plans, strict=True))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadlocks = [e for e in errors if "deadlock" in str(e)]
    assert not deadlocks, f"{len(deadlocks)} flush(es) deadlocked, first: {deadlocks[0]}"
    assert not errors, errors[0]
    assert counts(repos[0]) == expected  # and not one read lost


@pytest.mark.parametrize("backend", ASSET_BACKENDS)
def test_invalid_ids_are_dropped_and_counted_not_poisoning_the_flush(make_repo, backend, caplog):
    repo = make_repo(backend, **NO_PERIODIC_FLUSH)
    good = make_assets(repo, 3)
    for aid in good:
        repo.get_asset(aid)
    # What get_asset records after a read, with ids it could never have validated:
    bad = ["nul\x00byte", "", "x" * 256, "line\nbreak", "\ud800", 12345, None]
    for aid in bad:
        repo.note_access(aid)
    repo.get_asset(good[0])
    with caplog.at_level("WARNING", logger="esper_assets.storage.repository"):
        assert repo.flush_access() == 3
    assert repo.access_ids_dropped == len(bad)
    assert any("dropped" in r.getMessage() for r in caplog.records)
    assert counts(repo) == {good[0]: 2, good[1]: 1, good[2]: 1}
    assert repo.flush_access() == 0  # nothing left over to retry forever


def test_flush_of_ids_that_no_longer_match_any_row_is_harmless(make_repo):
    repo = make_repo("postgres", **NO_PERIODIC_FLUSH)
    (aid,) = make_assets(repo, 1)
    repo.get_asset(aid)
    repo.note_access("never-created")
    assert repo.flush_access() == 2  # ids written; one matched no row
    assert counts(repo) == {aid: 1}


# -- reads are counted in memory, written by flushes --------------------------------------
def test_reads_are_counted_in_memory_until_flushed(repo, other, make_repo, backend):
    small = repo.create_asset(meta("read-me"), blob())
    large = repo.create_asset(meta("read-me-big"), blob(THRESHOLD * 2))
    for _ in range(5):
        repo.get_asset(small)
    repo.get_asset(large)
    repo.get_asset(large)

    # Nothing reached the database yet.
    m = other.get_metadata(small)
    assert (m.access_count, m.last_accessed) == (0, None)
    assert [x.access_count for x in other.search_assets(AssetQuery().with_name("read-me"))] == [0]

    repo.flush_access()
    m = other.get_metadata(small)
    assert m.access_count == 5 and is_utc(m.last_accessed)
    assert other.get_metadata(large).access_count == 2
    repo.flush_access()  # nothing pending: nothing changes
    assert other.get_metadata(small).access_count == 5

    # Concurrent reads lose no counts.
    def read(_: int) -> None:
        for _ in range(25):
            repo.get_asset(small)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(read, range(4)))
    repo.flush_access()
    assert other.get_metadata(small).access_count == 105

    # close() flushes, and so does leaving the context manager.
    third = make_repo(backend, **REPO_OPTIONS)
    for _ in range(3):
        third.get_asset(small)
    third.close()
    assert other.get_metadata(small).access_count == 108
    with make_repo(backend, **REPO_OPTIONS) as fourth:
        fourth.get_asset(small)
    assert other.get_metadata(small).access_count == 109

    # And the periodic flush.
    periodic = make_repo(backend, **{**REPO_OPTIONS, "access_flush_interval_s": 0.1})
    periodic.get_asset(large)
    wait_until(lambda: other.get_metadata(large).access_count == 3, "the periodic flush")
