"""AssetRepository: creating, reading back, versions and duplicates, concurrent
creates, and updates (docs/ASSET_REPOSITORY_API.md), on both backends (see conftest).
"""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest

from esper_assets.errors import (
    AssetConflict,
    AssetExpired,
    AssetNotFound,
    EsperError,
    InvalidAssetField,
    InvalidInput,
    InvalidQuery,
    LineageCycle,
)
from esper_assets.storage.repository import AssetQuery, AssetRepository
from esper_assets_tests.storage.repository.conftest import (
    MAX_BYTES,
    THRESHOLD,
    blob,
    count,
    events,
    found,
    ids,
    is_utc,
    meta,
    objects,
    sha,
)


# -- public names ---------------------------------------------------------------------
def test_error_hierarchy():
    assert issubclass(AssetExpired, AssetNotFound)
    for cls in (InvalidAssetField, InvalidQuery):
        assert issubclass(cls, InvalidInput)
    for cls in (AssetNotFound, AssetConflict, LineageCycle, InvalidInput):
        assert issubclass(cls, EsperError)


# -- create / get -----------------------------------------------------------------------
def test_create_get_round_trip(repo, store):
    payload = blob(100)
    aid = repo.create_asset(
        meta(
            "resnet",
            tags={"cnn", "fast"},
            properties={"lr": 0.1, "model": {"layers": [1, 2]}, "ok": True},
            compilation_time_ms=12.5,
            created_by="alice",
        ),
        payload,
        actor="bob",
    )
    assert re.fullmatch(r"[0-9a-f]{32}", aid), aid

    got, data = repo.get_asset(aid)
    assert type(data) is bytes and data == payload
    assert got.asset_id == aid
    assert got.asset_type == "kernel" and got.name == "resnet"
    assert got.version == "v1" and got.version_number == 1
    assert got.previous_version_id is None
    assert got.checksum == sha(payload)
    assert got.size_bytes == 100
    assert got.created_by == "alice"
    assert set(got.tags) == {"cnn", "fast"}
    assert got.properties == {"lr": 0.1, "model": {"layers": [1, 2]}, "ok": True}
    assert got.compilation_time_ms == 12.5
    assert got.state == "active" and got.expires_at is None
    assert got.parent_id is None and list(got.derived_from) == []
    assert is_utc(got.created_at), got.created_at

    again = repo.get_metadata(aid)
    assert (again.asset_id, again.checksum, again.version, again.created_at) == (
        aid,
        got.checksum,
        "v1",
        got.created_at,
    )
    assert f"assets/{aid}" not in objects(store)  # small: inline
    assert count(repo) == 1
    log = repo.get_audit_log(aid)
    assert [(e["event"], e["actor"]) for e in log] == [("created", "bob")]


def test_large_data_lives_in_object_store(repo, store):
    at_threshold, above, big = blob(THRESHOLD), blob(THRESHOLD + 1), blob(50_000)
    inline_id = repo.create_asset(meta("at-threshold"), at_threshold)
    above_id = repo.create_asset(meta("above"), above)
    big_id = repo.create_asset(meta("big", asset_id="my-kernel.v1"), big)
    assert big_id == "my-kernel.v1"

    stored = objects(store, "assets/")
    assert f"assets/{inline_id}" not in stored
    assert f"assets/{above_id}" in stored
    assert "assets/my-kernel.v1" in stored
    for aid, payload in ((inline_id, at_threshold), (above_id, above), (big_id, big)):
        m, data = repo.get_asset(aid)
        assert data == payload, aid
        assert m.size_bytes == len(payload) and m.checksum == sha(payload)


# -- versioning and duplicates --------------------------------------------------------
def test_new_content_under_a_name_makes_the_next_version(repo):
    first = repo.create_asset(meta("model"), blob())
    second = repo.create_asset(meta("model"), blob(THRESHOLD * 2))
    third = repo.create_asset(meta("model"), blob())
    assert len({first, second, third}) == 3

    m1, m2, m3 = (repo.get_metadata(a) for a in (first, second, third))
    assert (m1.version_number, m1.version, m1.previous_version_id) == (1, "v1", None)
    assert (m2.version_number, m2.version, m2.previous_version_id) == (2, "v2", first)
    assert (m3.version_number, m3.version, m3.previous_version_id) == (3, "v3", second)
    assert found(repo, AssetQuery().with_name("model")) == {first, second, third}
    # The same name under another type is another series.
    other_type = repo.create_asset(meta("model", "blueprint"), blob())
    assert repo.get_metadata(other_type).version_number == 1


def test_explicit_version_labels_are_kept(repo):
    a = repo.create_asset(meta("lib", version="1.0.0"), blob())
    b = repo.create_asset(meta("lib", version="1.1.0"), blob())
    ma, mb = repo.get_metadata(a), repo.get_metadata(b)
    assert (ma.version, ma.version_number) == ("1.0.0", 1)
    assert (mb.version, mb.version_number, mb.previous_version_id) == ("1.1.0", 2, a)


def test_same_content_is_deduplicated(repo, store):
    small, large = blob(), blob(THRESHOLD * 3)
    a = repo.create_asset(meta("orig"), small)
    big = repo.create_asset(meta("orig-big"), large)
    rows, stored = count(repo), objects(store)

    assert repo.create_asset(meta("orig"), small) == a  # same name
    assert repo.create_asset(meta("renamed", tags={"x"}), small, actor="eve") == a
    assert repo.create_asset(meta("orig", version="9.9"), small) == a
    assert repo.create_asset(meta("other-name"), large) == big

    assert count(repo) == rows
    assert objects(store) == stored
    assert repo.get_metadata(a).version_number == 1
    assert repo.get_metadata(a).name == "orig"
    assert "duplicate" in events(repo, a)
    assert "duplicate" in events(repo, big)


def test_same_label_with_other_content_conflicts(repo, store):
    original = blob()
    a = repo.create_asset(meta("pinned", version="1.0"), original)
    rows, stored = count(repo), objects(store)
    with pytest.raises(AssetConflict):
        repo.create_asset(meta("pinned", version="1.0"), blob(THRESHOLD * 2))
    with pytest.raises(AssetConflict):
        repo.create_asset(meta("pinned", version="1.0"), blob())
    assert count(repo) == rows
    assert objects(store) == stored
    # Same label and same content is a duplicate, not a conflict.
    assert repo.create_asset(meta("pinned", version="1.0"), original) == a

    # An automatic label is a label like any other.
    auto = repo.create_asset(meta("auto"), blob())
    assert repo.get_metadata(auto).version == "v1"
    with pytest.raises(AssetConflict):
        repo.create_asset(meta("auto", version="v1"), blob())
    assert count(repo) == rows + 1


def test_same_checksum_under_another_type_is_not_a_duplicate(repo):
    payload = blob()
    kernel = repo.create_asset(meta("shared", "kernel"), payload)
    blueprint = repo.create_asset(meta("shared", "blueprint"), payload)
    checkpoint = repo.create_asset(meta("other", "checkpoint"), payload)
    assert len({kernel, blueprint, checkpoint}) == 3
    assert found(repo, AssetQuery().with_checksum(sha(payload))) == {
        kernel,
        blueprint,
        checkpoint,
    }
    for aid in (kernel, blueprint, checkpoint):
        assert repo.get_asset(aid)[1] == payload
        assert repo.get_metadata(aid).version_number == 1


# -- concurrency ----------------------------------------------------------------------
def test_concurrent_versions_have_no_gaps_or_duplicates(repo):
    threads, per_thread = 8, 4
    barrier = threading.Barrier(threads)
    contents = [
        [blob(THRESHOLD * 2 if (t + i) % 3 == 0 else 64) for i in range(per_thread)]
        for t in range(threads)
    ]

    def work(t: int) -> list[str]:
        barrier.wait()
        return [repo.create_asset(meta("contended"), c) for c in contents[t]]

    with ThreadPoolExecutor(threads) as pool:
        created = [aid for batch in pool.map(work, range(threads)) for aid in batch]

    n = threads * per_thread
    assert len(set(created)) == n
    rows = repo.search_assets(AssetQuery().with_name("contended").limit(10000))
    assert len(rows) == n and set(ids(rows)) == set(created)
    rows.sort(key=lambda m: m.version_number)
    assert [m.version_number for m in rows] == list(range(1, n + 1))
    assert [m.previous_version_id for m in rows] == [None] + [m.asset_id for m in rows[:-1]]
    assert len({m.version for m in rows}) == n
    data_by_checksum = {sha(c): c for batch in contents for c in batch}
    for m in rows[:: max(1, n // 6)]:
        assert repo.get_asset(m.asset_id)[1] == data_by_checksum[m.checksum]


def create_at_once(repo: AssetRepository, names: list[str], payload: bytes) -> set[str]:
    """One thread per name, all released together, each creating ``payload`` under it."""
    barrier = threading.Barrier(len(names))

    def work(name: str) -> str:
        barrier.wait()
        return repo.create_asset(meta(name), payload)

    with ThreadPoolExecutor(len(names)) as pool:
        return set(pool.map(work, names))


def test_concurrent_creates_of_the_same_content_make_one_asset(repo, store):
    payload = blob(THRESHOLD * 2)
    created = create_at_once(repo, ["same"] * 8, payload)
    assert len(created) == 1
    (aid,) = created
    assert count(repo) == 1
    assert repo.get_metadata(aid).version_number == 1
    assert repo.get_asset(aid)[1] == payload
    assert [k for k in objects(store, "assets/")] == [f"assets/{aid}"]


def test_concurrent_creates_of_the_same_content_under_other_names(repo, store):
    payload = blob(THRESHOLD * 2)
    created = create_at_once(repo, [f"name-{t}" for t in range(8)], payload)
    assert len(created) == 1
    (aid,) = created
    assert count(repo) == 1
    assert found(repo, AssetQuery().with_checksum(sha(payload))) == {aid}
    assert repo.get_asset(aid)[1] == payload
    assert list(objects(store, "assets/")) == [f"assets/{aid}"]


# -- update_asset -----------------------------------------------------------------------
def test_update_metadata_in_place(repo, other):
    payload = blob()
    aid = repo.create_asset(meta("mutable", tags={"a"}, properties={"x": 1}), payload)
    before = repo.get_metadata(aid)
    parent = repo.create_asset(meta("parent"), blob())
    source = repo.create_asset(meta("source"), blob())
    expires = datetime.now(UTC) + timedelta(days=30)

    result = repo.update_asset(
        aid,
        {
            "tags": {"b", "c"},
            "properties": {"y": {"z": 2}},
            "compilation_time_ms": 3.5,
            "created_by": "carol",
            "expires_at": expires,
            "parent_id": parent,
            "derived_from": [source],
            "state": "deprecated",
        },
        actor="dave",
    )
    assert result == aid
    assert count(repo) == 3
    for m in (repo.get_metadata(aid), other.get_metadata(aid)):
        assert set(m.tags) == {"b", "c"}
        assert m.properties == {"y": {"z": 2}}
        assert m.compilation_time_ms == 3.5
        assert m.created_by == "carol"
        assert m.expires_at is not None and abs(m.expires_at - expires) < timedelta(seconds=1)
        assert m.parent_id == parent and list(m.derived_from) == [source]
        assert m.state == "deprecated"
        # Identity, content and version are untouched.
        assert (m.name, m.version, m.version_number, m.checksum, m.created_at) == (
            before.name,
            before.version,
            before.version_number,
            before.checksum,
            before.created_at,
        )
    assert repo.get_asset(aid)[1] == payload
    log = repo.get_audit_log(aid)
    assert (log[-1]["event"], log[-1]["actor"]) == ("updated", "dave")


def test_update_with_new_data_makes_the_next_version(repo, store):
    old_data, new_data = blob(), blob(THRESHOLD * 4)
    old = repo.create_asset(
        meta("evolving", tags={"a"}, properties={"p": 1}, compilation_time_ms=7.0), old_data
    )
    new = repo.update_asset(old, {"tags": {"b"}}, new_data=new_data, actor="erin")
    assert new != old
    assert count(repo) == 2

    m_new, data = repo.get_asset(new)
    assert data == new_data
    assert (m_new.name, m_new.asset_type) == ("evolving", "kernel")
    assert m_new.version_number == 2 and m_new.previous_version_id == old
    assert m_new.version == "v2"
    assert set(m_new.tags) == {"b"}
    assert m_new.properties == {"p": 1} and m_new.compilation_time_ms == 7.0
    assert m_new.checksum == sha(new_data) and m_new.size_bytes == len(new_data)
    assert f"assets/{new}" in objects(store, "assets/")

    m_old, data = repo.get_asset(old)
    assert data == old_data
    assert set(m_old.tags) == {"a"} and m_old.version_number == 1
    assert "new_version" in events(repo, old) + events(repo, new)


def test_update_with_unknown_or_bad_fields_changes_nothing(repo, store):
    aid = repo.create_asset(meta("strict", tags={"keep"}, properties={"k": "v"}), blob())
    before = repo.get_metadata(aid)
    log_before = repo.get_audit_log(aid)
    rows, stored = count(repo), objects(store)

    for updates in (
        {"bogus": 1},
        {"tags": {"changed"}, "bogus": 1},
        {"checksum": "0" * 64},
        {"asset_id": "new-id"},
    ):
        with pytest.raises(InvalidAssetField):
            repo.update_asset(aid, updates)
        with pytest.raises(InvalidAssetField):
            repo.update_asset(aid, updates, new_data=blob(THRESHOLD * 2))
    for updates in ({"name": "renamed"}, {"version": "9.9"}, {"version_number": 7}):
        with pytest.raises(InvalidAssetField):
            repo.update_asset(aid, updates)
    for updates in (
        {"state": "deleted"},
        {"tags": {"a,b"}},
        {"tags": {""}},
        {"properties": {"x": float("nan")}},
        {"properties": ["not", "a", "dict"]},
    ):
        with pytest.raises(InvalidInput):
            repo.update_asset(aid, updates)
        with pytest.raises(InvalidInput):
            repo.update_asset(aid, updates, new_data=blob(THRESHOLD * 2))
    for new_data in ("text", 12, b"\x01" * (MAX_BYTES + 1)):
        with pytest.raises(InvalidInput):
            repo.update_asset(aid, {"tags": {"x"}}, new_data=new_data)

    after = repo.get_metadata(aid)
    assert set(after.tags) == {"keep"} and after.properties == {"k": "v"}
    assert after.state == "active" and after.version_number == 1
    assert after.checksum == before.checksum
    assert count(repo) == rows
    assert objects(store) == stored
    assert repo.get_audit_log(aid) == log_before


def test_update_with_no_fields_is_a_no_op(repo):
    aid = repo.create_asset(meta("untouched", tags={"t"}), blob())
    before = repo.get_metadata(aid)
    try:
        result = repo.update_asset(aid, {})
    except InvalidInput:
        result = aid  # refusing an empty update is fine too; failing as storage is not
    assert result == aid
    after = repo.get_metadata(aid)
    assert (after.tags, after.properties, after.state) == (before.tags, before.properties, "active")


def test_unknown_ids_are_not_found(repo):
    repo.create_asset(meta("present", asset_id="present"), blob())
    for missing in ("absent", "present' OR '1'='1", "%", "present%"):
        with pytest.raises(AssetNotFound):
            repo.get_asset(missing)
        with pytest.raises(AssetNotFound):
            repo.get_metadata(missing)
        with pytest.raises(AssetNotFound):
            repo.update_asset(missing, {"tags": {"x"}})
        with pytest.raises(AssetNotFound):
            repo.deprecate_asset(missing, "why")
        with pytest.raises(AssetNotFound):
            repo.get_lineage(missing)
    assert repo.get_metadata("present").state == "active"
    assert set(repo.get_metadata("present").tags) == set()
