"""AssetRepository after creation: deprecation, archiving, retirement, expiry,
usage analytics, the audit log and garbage collection, on both backends.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from esper_assets.errors import (
    AssetExpired,
    AssetNotFound,
)
from esper_assets.storage.repository import AssetMetadata, AssetQuery
from esper_assets_tests.storage.repository.conftest import (
    THRESHOLD,
    TICK,
    blob,
    create_spaced,
    found,
    is_utc,
    meta,
    midpoint,
    objects,
)


# -- lifecycle --------------------------------------------------------------------------
def test_deprecate_asset(repo):
    payload = blob()
    aid = repo.create_asset(meta("old-news"), payload)
    assert repo.deprecate_asset(aid, "replaced by new-news", actor="frank") is None
    m, data = repo.get_asset(aid)
    assert m.state == "deprecated" and data == payload
    entry = repo.get_audit_log(aid)[-1]
    assert entry["actor"] == "frank"
    assert "replaced by new-news" in str(entry["details"])
    assert found(repo, AssetQuery().with_state("deprecated")) == {aid}


def test_archive_assets_moves_data_to_archive(repo, store):
    small, large = blob(100), blob(THRESHOLD * 5)
    s, big = create_spaced(repo, (meta("small-old"), small), (meta("big-old"), large))
    time.sleep(TICK)
    young = repo.create_asset(meta("young"), blob(THRESHOLD * 2))
    assert f"assets/{big}" in objects(store, "assets/")
    cutoff = midpoint(repo.get_metadata(big).created_at, repo.get_metadata(young).created_at)

    assert repo.archive_assets(cutoff) == 2
    assert repo.get_metadata(s).state == "archived"
    assert repo.get_metadata(big).state == "archived"
    assert repo.get_metadata(young).state == "active"

    archived = objects(store, "archive/")
    assert f"archive/{s}" in archived and f"archive/{big}" in archived
    assert f"archive/{young}" not in archived
    live = objects(store, "assets/")
    assert f"assets/{big}" not in live and f"assets/{young}" in live

    assert repo.get_asset(s)[1] == small
    assert repo.get_asset(big)[1] == large
    assert found(repo, AssetQuery().with_state("archived")) == {s, big}
    # Garbage collection leaves archived data (and its rows) alone.
    repo.collect_garbage(grace=timedelta(0))
    assert repo.get_asset(big)[1] == large and repo.get_asset(s)[1] == small
    # Nothing left to archive before the cutoff.
    assert repo.archive_assets(cutoff) == 0


@pytest.mark.slow
def test_reads_during_archiving_always_get_the_data(repo):
    """A reader racing archive_assets must get the bytes (spec: still readable)."""
    errors: list[str] = []
    for round_ in range(40):  # a race: enough rounds that a miss is unlikely
        payload = blob(THRESHOLD * 2)
        aid = repo.create_asset(meta(f"moving-{round_}"), payload)
        stop = threading.Event()
        started = threading.Barrier(4)

        def read(aid=aid, payload=payload, stop=stop, started=started) -> int:
            started.wait()
            reads = 0
            while not stop.is_set() or reads == 0:
                try:
                    if repo.get_asset(aid)[1] != payload:
                        errors.append(f"{aid}: wrong bytes")
                except Exception as exc:  # noqa: BLE001 - collected and reported
                    errors.append(f"{aid}: {type(exc).__name__}: {exc}")
                reads += 1
            return reads

        with ThreadPoolExecutor(3) as pool:
            readers = [pool.submit(read) for _ in range(3)]
            started.wait()
            archived = repo.archive_assets(datetime.now(UTC) + timedelta(days=1))
            stop.set()
            assert all(r.result() > 0 for r in readers)
        assert archived == 1
        assert repo.get_asset(aid)[1] == payload
    assert errors == []


def test_deprecate_unused(repo):
    a, b, c = create_spaced(
        repo, (meta("used"), blob()), (meta("idle"), blob()), (meta("gone"), blob())
    )
    repo.deprecate_asset(c, "gone")
    time.sleep(TICK * 3)
    repo.get_asset(a)
    repo.flush_access()
    time.sleep(TICK)
    d = repo.create_asset(meta("new-never-read"), blob())

    accessed = repo.get_metadata(a).last_accessed
    assert is_utc(accessed)
    cutoff = midpoint(repo.get_metadata(c).created_at, accessed)
    assert repo.get_metadata(d).created_at > cutoff
    now = cutoff + timedelta(days=1)

    assert set(repo.deprecate_unused(timedelta(days=1), now=now)) == {b}
    states = {x: repo.get_metadata(x).state for x in (a, b, c, d)}
    assert states == {a: "active", b: "deprecated", c: "deprecated", d: "active"}

    far = datetime.now(UTC) + timedelta(days=365)
    assert repo.deprecate_unused(timedelta(days=3650), now=far) == []
    assert set(repo.deprecate_unused(timedelta(days=1), now=far)) == {a, d}
    assert found(repo, AssetQuery().with_state("active")) == set()


def test_apply_retirement_policy(repo):
    small = repo.create_asset(meta("small"), blob(100))
    big = repo.create_asset(meta("huge"), blob(THRESHOLD * 2))
    seen: list[str] = []

    def policy(m: AssetMetadata) -> str | None:
        assert isinstance(m, AssetMetadata)
        seen.append(m.asset_id)
        return "too big" if m.size_bytes > THRESHOLD else None

    assert repo.apply_retirement_policy(policy) == [big]
    assert {small, big} <= set(seen)
    assert repo.get_metadata(big).state == "deprecated"
    assert repo.get_metadata(small).state == "active"
    assert "too big" in str(repo.get_audit_log(big)[-1]["details"])
    assert repo.apply_retirement_policy(lambda m: None) == []


def test_expired_assets(repo):
    past = datetime.now(UTC) - timedelta(days=1)
    future = datetime.now(UTC) + timedelta(days=1)
    gone = repo.create_asset(meta("gone", expires_at=past), blob(THRESHOLD * 2))
    later = repo.create_asset(meta("later", expires_at=future), blob())
    never = repo.create_asset(meta("never"), blob())

    with pytest.raises(AssetExpired):
        repo.get_asset(gone)
    with pytest.raises(AssetNotFound):
        repo.get_asset(gone)
    assert repo.get_asset(later)[0].asset_id == later

    q = AssetQuery()
    assert found(repo, q) == {later, never}
    assert found(repo, q.include_expired()) == {gone, later, never}
    assert found(repo, q.with_name("gone")) == set()
    assert found(repo, q.with_name("gone").include_expired()) == {gone}

    repo.update_asset(never, {"expires_at": past})
    with pytest.raises(AssetExpired):
        repo.get_asset(never)
    assert found(repo, q) == {later}


# -- analytics and audit ----------------------------------------------------------------
def test_usage_analytics(repo):
    k1 = repo.create_asset(meta("k1"), blob(100))
    k2 = repo.create_asset(meta("k2"), blob(2000))
    b1 = repo.create_asset(meta("b1", "blueprint"), blob(50))
    c1 = repo.create_asset(meta("c1", "checkpoint"), blob(10))
    repo.deprecate_asset(b1, "old")
    for aid, reads in ((k2, 5), (k1, 3), (c1, 1)):
        for _ in range(reads):
            repo.get_asset(aid)
    repo.flush_access()

    stats = repo.get_usage_analytics()
    assert stats["total_assets"] == 4
    assert {k: v for k, v in stats["by_type"].items() if v} == {
        "kernel": 2,
        "blueprint": 1,
        "checkpoint": 1,
    }
    assert {k: v for k, v in stats["by_state"].items() if v} == {"active": 3, "deprecated": 1}
    hot = [(h["asset_id"], h["name"], h["access_count"]) for h in stats["hot_assets"]]
    assert hot[:3] == [(k2, "k2", 5), (k1, "k1", 3), (c1, "c1", 1)]
    assert all(n == 0 for _, _, n in hot[3:])
    assert stats["storage_size_bytes"] == 2160
    assert stats["avg_asset_size_bytes"] == pytest.approx(540)


def test_audit_log_is_oldest_first(repo):
    aid = repo.create_asset(meta("audited"), blob(), actor="alice")
    repo.update_asset(aid, {"tags": {"t"}}, actor="bob")
    repo.create_asset(meta("audited-again"), repo.get_asset(aid)[1], actor="dan")
    repo.deprecate_asset(aid, "because", actor="carol")

    log = repo.get_audit_log(aid)
    assert [e["event"] for e in log[:3]] == ["created", "updated", "duplicate"]
    assert [e["actor"] for e in log] == ["alice", "bob", "dan", "carol"]
    assert "because" in str(log[-1]["details"])
    stamps = [e["at"] for e in log]
    assert stamps == sorted(stamps)
    assert all({"event", "actor", "at", "details"} <= set(e) for e in log)


# -- garbage collection -----------------------------------------------------------------
def test_collect_garbage_removes_only_unreferenced_objects(repo, store):
    large = blob(THRESHOLD * 2)
    aid = repo.create_asset(meta("kept"), large)
    store.put("assets/orphan-1", b"left behind by a crashed writer")
    store.put("other/not-mine", b"x")
    store.put("archive/not-mine-either", b"y")

    assert repo.collect_garbage() == []  # younger than the default grace
    assert "assets/orphan-1" in objects(store)

    assert repo.collect_garbage(grace=timedelta(0)) == ["assets/orphan-1"]
    left = objects(store)
    assert "assets/orphan-1" not in left
    assert {f"assets/{aid}", "other/not-mine", "archive/not-mine-either"} <= set(left)
    assert repo.get_asset(aid)[1] == large
    assert repo.collect_garbage(grace=timedelta(0)) == []
