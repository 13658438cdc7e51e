"""AssetRepository (docs/ASSET_REPOSITORY_API.md) against real backends.

One suite, two backends: ``sqlite`` (SQLite file + DirectoryObjectStore) and
``postgres`` (a fresh PostgreSQL schema + S3 over HTTP served by moto). Nothing is
mocked. A small ``large_object_threshold`` makes both inline and object-store data
appear; a huge ``access_flush_interval_s`` makes access counts reach the database
only through ``flush_access()`` / ``close()`` unless a test asks otherwise.

Objects are inspected through a second ObjectStore on the same location; rows that
must (not) have reached the database are read through a second AssetRepository on
the same database, which shares no memory with the first.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import threading
import time
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
    InvalidValue,
    LineageCycle,
)
from esper_assets.storage import AssetMetadata, AssetQuery, AssetRepository
from esper_assets_tests.conftest import ASSET_BACKENDS, wait_until

THRESHOLD = 1024
MAX_BYTES = 64 * 1024
REPO_OPTIONS = {
    "large_object_threshold": THRESHOLD,
    "max_asset_bytes": MAX_BYTES,
    "access_flush_interval_s": 3600.0,
}
TICK = 0.02  # between creates whose created_at must differ (ordering, not timing)


# -- fixtures and helpers ---------------------------------------------------------------
@pytest.fixture(params=ASSET_BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def repo(make_repo, backend) -> AssetRepository:
    return make_repo(backend, **REPO_OPTIONS)


@pytest.fixture
def other(make_repo, backend, repo) -> AssetRepository:
    """A second repository on the same database and object store (no shared memory)."""
    return make_repo(backend, **REPO_OPTIONS)


@pytest.fixture
def store(make_repo, backend):
    return make_repo.store(backend)


_seeds = itertools.count(1)


def blob(n: int = 64) -> bytes:
    """Fresh random bytes: never equal to any other blob() of the session."""
    return random.Random(next(_seeds)).randbytes(n)


def meta(name: str = "asset", asset_type: str = "kernel", **fields) -> AssetMetadata:
    return AssetMetadata(asset_type=asset_type, name=name, **fields)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def everything(repo: AssetRepository) -> list[AssetMetadata]:
    return repo.search_assets(AssetQuery().include_expired().limit(10000))


def count(repo: AssetRepository) -> int:
    return len(everything(repo))


def ids(results) -> list[str]:
    return [m.asset_id for m in results]


def found(repo: AssetRepository, query: AssetQuery) -> set[str]:
    results = ids(repo.search_assets(query))
    assert len(results) == len(set(results)), f"duplicate rows in {results}"
    return set(results)


def objects(store, prefix: str = "") -> dict[str, int]:
    return {entry[0]: entry[1] for entry in store.list(prefix)}


def events(repo: AssetRepository, asset_id: str) -> list[str]:
    return [e["event"] for e in repo.get_audit_log(asset_id)]


def midpoint(a: datetime, b: datetime) -> datetime:
    assert a < b, f"created_at values must differ: {a} !< {b}"
    return a + (b - a) / 2


def is_utc(dt: datetime | None) -> bool:
    return dt is not None and dt.tzinfo is not None and dt.utcoffset() == timedelta(0)


def create_spaced(repo: AssetRepository, *specs: tuple[AssetMetadata, bytes]) -> list[str]:
    """Create assets one after the other with strictly increasing created_at."""
    created = []
    for m, data in specs:
        if created:
            time.sleep(TICK)
        created.append(repo.create_asset(m, data))
    return created


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


def test_concurrent_creates_of_the_same_content_make_one_asset(repo, store):
    threads = 8
    payload = blob(THRESHOLD * 2)
    barrier = threading.Barrier(threads)

    def work(_: int) -> str:
        barrier.wait()
        return repo.create_asset(meta("same"), payload)

    with ThreadPoolExecutor(threads) as pool:
        created = set(pool.map(work, range(threads)))
    assert len(created) == 1
    (aid,) = created
    assert count(repo) == 1
    assert repo.get_metadata(aid).version_number == 1
    assert repo.get_asset(aid)[1] == payload
    assert [k for k in objects(store, "assets/")] == [f"assets/{aid}"]


def test_concurrent_creates_of_the_same_content_under_other_names(repo, store):
    threads = 8
    payload = blob(THRESHOLD * 2)
    barrier = threading.Barrier(threads)

    def work(t: int) -> str:
        barrier.wait()
        return repo.create_asset(meta(f"name-{t}"), payload)

    with ThreadPoolExecutor(threads) as pool:
        created = set(pool.map(work, range(threads)))
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


# -- search -----------------------------------------------------------------------------
@pytest.fixture
def catalogue(repo) -> dict[str, str]:
    """Four assets with distinct created_at, sizes and compilation times."""
    k1, k2, b1 = create_spaced(
        repo,
        (
            meta(
                "conv-small",
                tags={"cnn", "fast"},
                properties={"arch": "ResNet", "model": {"layers": 12, "heads": 8}, "flag": True},
                compilation_time_ms=5.0,
            ),
            blob(10),
        ),
        (
            meta(
                "conv-large",
                tags={"cnn"},
                properties={"arch": "vgg", "model": {"layers": 24}, "flag": 1},
                compilation_time_ms=50.0,
            ),
            blob(2000),
        ),
        (
            meta(
                "attn-block",
                "blueprint",
                tags={"fast", "transformer"},
                properties={"arch": "Transformer", "model": {"layers": 12}, "flag": "1"},
                compilation_time_ms=1.0,
            ),
            blob(30),
        ),
    )
    time.sleep(TICK)
    c1 = repo.create_asset(
        meta("ckpt", "checkpoint", parent_id=k1, compilation_time_ms=10.0), blob(20)
    )
    repo.update_asset(b1, {"parent_id": k1})
    return {"k1": k1, "k2": k2, "b1": b1, "c1": c1}


def test_search_filters(repo, catalogue):
    k1, k2, b1, c1 = (catalogue[k] for k in ("k1", "k2", "b1", "c1"))
    q = AssetQuery()

    def check(query: AssetQuery, expected: set[str]) -> None:
        assert found(repo, query) == expected

    check(q, {k1, k2, b1, c1})
    check(q.with_type("kernel"), {k1, k2})
    check(q.with_type("kernel", "checkpoint"), {k1, k2, c1})

    check(q.with_tags(["cnn", "fast"]), {k1})
    check(q.with_tags(["cnn", "fast"], match="all"), {k1})
    check(q.with_tags(["cnn", "fast"], match="any"), {k1, k2, b1})
    check(q.with_tags(["transformer"], match="any"), {b1})
    check(q.with_tags(["nope"], match="any"), set())

    check(q.with_properties({"model": {"layers": 12}}), {k1, b1})
    check(q.with_properties({"model": {"layers": 12, "heads": 8}}), {k1})
    check(q.with_properties({"model": {"layers": 13}}), set())
    check(q.with_properties({"arch": "vgg"}), {k2})
    check(q.with_properties({"arch": "VGG"}), set())  # values match exactly
    check(q.with_properties({"flag": True}), {k1})
    check(q.with_properties({"flag": 1}), {k2})
    check(q.with_properties({"flag": "1"}), {b1})
    check(q.with_properties({"missing": 1}), set())

    t = {k: repo.get_metadata(v).created_at for k, v in catalogue.items()}
    check(q.created_after(midpoint(t["k2"], t["b1"])), {b1, c1})
    check(q.created_before(midpoint(t["k2"], t["b1"])), {k1, k2})
    check(
        q.created_after(midpoint(t["k1"], t["k2"])).created_before(midpoint(t["b1"], t["c1"])),
        {k2, b1},
    )
    check(q.created_after(datetime.now(UTC) + timedelta(days=1)), set())
    check(q.created_before(datetime.now(UTC) - timedelta(days=1)), set())

    check(q.with_parent(k1), {b1, c1})
    check(q.with_parent(k2), set())
    check(q.with_checksum(repo.get_metadata(k2).checksum), {k2})
    check(q.with_name("conv-small"), {k1})
    check(q.with_name("conv"), set())  # exact, not a pattern

    check(q.text("resnet"), {k1})  # property value, other case
    check(q.text("CONV"), {k1, k2})  # name
    check(q.text("TRANSFORMER"), {b1})
    check(q.text("zzz"), set())

    repo.deprecate_asset(c1, "superseded")
    check(q.with_state("deprecated"), {c1})
    check(q.with_state("active"), {k1, k2, b1})
    check(q.with_state("archived"), set())

    check(q.with_type("kernel").with_tags(["cnn"]).with_properties({"arch": "vgg"}), {k2})

    # The builder is immutable: each call returns a new query.
    base = AssetQuery().with_type("kernel")
    narrower = base.with_name("conv-small")
    assert narrower is not base
    check(base, {k1, k2})
    check(narrower, {k1})
    check(q, {k1, k2, b1, c1})


def test_property_containment_follows_json_rules(repo):
    lists = repo.create_asset(
        meta("lists", properties={"layers": [1, 2, 3], "items": [{"k": 1, "j": 2}, {"k": 3}]}),
        blob(),
    )
    scalar = repo.create_asset(meta("scalar", properties={"layers": 2, "n": None}), blob())
    q = AssetQuery()
    assert found(repo, q.with_properties({"layers": [2]})) == {lists}
    assert found(repo, q.with_properties({"layers": [3, 1]})) == {lists}
    assert found(repo, q.with_properties({"layers": [4]})) == set()
    assert found(repo, q.with_properties({"layers": 2})) == {scalar}
    assert found(repo, q.with_properties({"items": [{"k": 1}]})) == {lists}
    assert found(repo, q.with_properties({"items": [{"k": 2}]})) == set()
    assert found(repo, q.with_properties({"n": None})) == {scalar}
    assert found(repo, q.with_properties({"layers": 2.0})) == {scalar}  # JSON numbers
    with pytest.raises(InvalidQuery):
        q.with_properties({"x": float("nan")})
    with pytest.raises(InvalidQuery):
        q.with_properties(["not", "a", "dict"])


def test_search_order_limit_offset(repo):
    names = ["echo", "charlie", "alpha", "delta", "bravo"]
    sizes = [50, 10, 40, 20, 30]
    times = [3.0, 1.0, 5.0, 2.0, 4.0]
    created = create_spaced(
        repo,
        *[
            (meta(n, compilation_time_ms=c), blob(s))
            for n, s, c in zip(names, sizes, times, strict=True)
        ],
    )
    by_name = dict(zip(names, created, strict=True))
    q = AssetQuery()

    def order(query: AssetQuery) -> list[str]:
        return ids(repo.search_assets(query))

    alphabetical = [by_name[n] for n in sorted(names)]
    assert order(q.order_by("name")) == alphabetical
    assert order(q.order_by("name", ascending=False)) == alphabetical[::-1]
    assert order(q.order_by("size_bytes", ascending=False)) == [
        by_name[n] for n in ["echo", "alpha", "bravo", "delta", "charlie"]
    ]
    assert order(q.order_by("compilation_time_ms")) == [
        by_name[n] for n in ["charlie", "delta", "echo", "bravo", "alpha"]
    ]
    assert order(q.order_by("created_at")) == created
    assert order(q.order_by("created_at", ascending=False)) == created[::-1]

    assert order(q.order_by("name").limit(2)) == alphabetical[:2]
    assert order(q.order_by("name").offset(1).limit(2)) == alphabetical[1:3]
    assert order(q.order_by("name").offset(3)) == alphabetical[3:]
    assert order(q.order_by("name").offset(10)) == []
    assert order(q.limit(0)) == []
    assert len(order(q.limit(10000))) == 5

    versions = [repo.create_asset(meta("series"), blob()) for _ in range(3)]
    assert (
        order(q.with_name("series").order_by("version_number", ascending=False)) == (versions[::-1])
    )

    for aid, reads in ((by_name["bravo"], 3), (by_name["delta"], 1), (by_name["echo"], 2)):
        for _ in range(reads):
            repo.get_asset(aid)
    repo.flush_access()
    top = order(q.with_type("kernel").order_by("access_count", ascending=False).limit(3))
    assert top == [by_name["bravo"], by_name["echo"], by_name["delta"]]
    assert len(order(q.order_by("last_accessed"))) == 8


def test_bad_query_values_raise_at_build_time():
    q = AssetQuery()
    bad = [
        lambda: q.order_by("nope"),
        lambda: q.order_by("name; DROP TABLE assets"),
        lambda: q.order_by("checksum"),
        lambda: q.limit(-1),
        lambda: q.limit(10001),
        lambda: q.offset(-1),
        lambda: q.with_state("deleted"),
        lambda: q.with_type("model"),
        lambda: q.with_type("kernel", "model"),
        lambda: q.with_tags(["a"], match="some"),
    ]
    for build in bad:
        with pytest.raises(InvalidQuery):
            build()
    # The edges are allowed.
    q.limit(0)
    q.limit(10000)
    q.offset(0)
    for field in (
        "created_at",
        "name",
        "version_number",
        "size_bytes",
        "compilation_time_ms",
        "access_count",
        "last_accessed",
    ):
        q.order_by(field)
        q.order_by(field, ascending=False)


def test_text_search_finds_values_holding_quotes_and_backslashes(repo):
    quoted = repo.create_asset(meta("quoted", properties={"said": 'he said "hi"'}), blob())
    path = repo.create_asset(meta("path", properties={"dir": "C:\\tmp\\x"}), blob())
    repo.create_asset(meta("plain", properties={"k": "v"}), blob())
    q = AssetQuery()
    assert found(repo, q.text('said "hi"')) == {quoted}
    assert found(repo, q.text('"')) == {quoted}
    assert found(repo, q.text("C:\\tmp\\")) == {path}
    assert found(repo, q.text("\\")) == {path}


def test_text_search_ignores_json_syntax(repo):
    repo.create_asset(meta("plain", properties={"k": "v", "n": [1, {"x": 2}]}), blob())
    repo.create_asset(meta("empty"), blob())
    repo.create_asset(meta("swiss", properties={"city": "Zürich"}), blob())
    q = AssetQuery()
    for syntax in ("{", "}", ":", '":"', '","', '"'):
        assert found(repo, q.text(syntax)) == set(), f"text({syntax!r})"
    assert found(repo, q.text("\\")) == set()  # no backslash anywhere (\u00fc is an escape)


def test_text_search_finds_non_ascii_property_values(repo):
    swiss = repo.create_asset(meta("swiss", properties={"city": "Zürich"}), blob())
    assert found(repo, AssetQuery().text("zürich")) == {swiss}
    assert found(repo, AssetQuery().text("ürich")) == {swiss}


def test_text_search_folds_case_beyond_ascii(repo):
    swiss = repo.create_asset(meta("Zürich-Ökonomie", properties={"city": "ÅLESUND"}), blob())
    q = AssetQuery()
    assert found(repo, q.text("zürich-ökonomie")) == {swiss}
    assert found(repo, q.text("ZÜRICH")) == {swiss}
    assert found(repo, q.text("ålesund")) == {swiss}


# -- SQL injection ----------------------------------------------------------------------
EVIL = [
    "x'; DROP TABLE assets; --",
    "%",
    "_",
    "\\",
    "' OR '1'='1",
    "a%b_c\\d",
    "*",
    "[a]",
    "'",
    "$1",
    "%s",
    "?",
    "'); DELETE FROM assets; --",
]


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in [k, *_strings(v)]]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def test_sql_injection_is_inert(repo, store):
    contents: dict[str, bytes] = {}
    for i, evil in enumerate(EVIL):
        payload = blob(THRESHOLD * 2 if i < 2 else 32)
        aid = repo.create_asset(
            meta(evil, asset_id=evil, tags={evil}, properties={evil: evil, "n": {evil: [evil]}}),
            payload,
        )
        assert aid == evil
        contents[evil] = payload
    plain = repo.create_asset(meta("plain-one", tags={"plain"}, properties={"k": "v"}), blob())
    child = repo.create_asset(
        meta("Plain Two", properties={"note": "hello world"}, parent_id="' OR '1'='1"), blob()
    )
    total = len(EVIL) + 2
    assert count(repo) == total
    catalogue = {m.asset_id: m for m in everything(repo)}

    q = AssetQuery()
    for evil in EVIL:
        context = f"needle {evil!r}"
        assert found(repo, q.with_name(evil)) == {evil}, context
        assert found(repo, q.with_tags([evil])) == {evil}, context
        assert found(repo, q.with_tags([evil, "plain"], match="any")) == {evil, plain}, context
        assert found(repo, q.with_tags([evil, "plain"], match="all")) == set(), context
        assert found(repo, q.with_properties({evil: evil})) == {evil}, context
        assert found(repo, q.with_properties({"n": {evil: [evil]}})) == {evil}, context
        expected_text = {
            aid
            for aid, m in catalogue.items()
            if any(evil.lower() in s.lower() for s in [m.name, *_strings(m.properties)])
        }
        assert found(repo, q.text(evil)) == expected_text, context
        assert found(repo, q.with_parent(evil)) == ({child} if evil == "' OR '1'='1" else set())
        try:
            by_checksum = found(repo, q.with_checksum(evil))
        except InvalidQuery:
            by_checksum = set()
        assert by_checksum == set(), context
        m, data = repo.get_asset(evil)
        assert (m.asset_id, m.name, data) == (evil, evil, contents[evil]), context
        with pytest.raises(AssetNotFound):
            repo.get_asset(evil + "-missing")
        with pytest.raises(InvalidQuery):
            q.order_by(evil)

    # Writes with hostile values in every field.
    repo.update_asset(EVIL[0], {"tags": set(EVIL), "properties": {e: e for e in EVIL}})
    assert found(repo, q.with_tags(EVIL)) == {EVIL[0]}
    repo.deprecate_asset(EVIL[4], reason=EVIL[0])
    assert EVIL[0] in str(repo.get_audit_log(EVIL[4])[-1]["details"])

    # The tables are intact: same rows, and writing and searching still work.
    assert count(repo) == total
    assert set(ids(everything(repo))) == set(catalogue)
    later = repo.create_asset(meta("after-the-attack", tags={"later"}), blob())
    assert found(repo, q.with_tags(["later"])) == {later}
    assert count(repo) == total + 1
    assert repo.get_usage_analytics()["total_assets"] == total + 1
    for evil in EVIL[:2]:
        assert f"assets/{evil}" in objects(store, "assets/")


# -- lineage ----------------------------------------------------------------------------
def test_lineage(repo):
    a = repo.create_asset(meta("gen-a"), blob())
    b = repo.create_asset(meta("gen-b", parent_id=a), blob())
    c = repo.create_asset(meta("gen-c", parent_id=b), blob(THRESHOLD * 2))
    d = repo.create_asset(meta("gen-d", parent_id=c), blob())
    e = repo.create_asset(meta("gen-b-sibling-child", parent_id=b), blob())
    f = repo.create_asset(meta("derived", derived_from=[a, d]), blob())

    def as_ids(value):
        if value is None:
            return None
        if isinstance(value, AssetMetadata):
            return value.asset_id
        return [m.asset_id for m in value]

    lin = repo.get_lineage(b)
    assert as_ids(lin["asset"]) == b
    assert as_ids(lin["parent"]) == a
    assert set(as_ids(lin["children"])) == {c, e} and len(lin["children"]) == 2
    assert as_ids(lin["ancestors"]) == [a]
    assert set(as_ids(lin["descendants"])) == {c, d, e} and len(lin["descendants"]) == 3

    lin = repo.get_lineage(d)
    assert as_ids(lin["parent"]) == c and as_ids(lin["children"]) == []
    assert as_ids(lin["ancestors"]) == [c, b, a]  # nearest first
    assert as_ids(lin["descendants"]) == []
    assert as_ids(repo.get_lineage(d, depth=2)["ancestors"]) == [c, b]
    assert as_ids(repo.get_lineage(d, depth=1)["ancestors"]) == [c]

    lin = repo.get_lineage(a)
    assert lin["parent"] is None and as_ids(lin["ancestors"]) == []
    assert as_ids(lin["children"]) == [b]
    assert set(as_ids(lin["descendants"])) == {b, c, d, e}
    assert set(as_ids(repo.get_lineage(a, depth=1)["descendants"])) == {b}
    assert set(as_ids(repo.get_lineage(a, depth=2)["descendants"])) == {b, c, e}

    fm = repo.get_metadata(f)
    assert sorted(fm.derived_from) == sorted([a, d]) and len(fm.derived_from) == 2

    # Re-parenting that keeps a tree is fine.
    assert repo.update_asset(e, {"parent_id": d}) == e
    assert as_ids(repo.get_lineage(d)["children"]) == [e]
    assert as_ids(repo.get_lineage(e)["ancestors"]) == [d, c, b, a]
    repo.update_asset(e, {"parent_id": None})
    assert repo.get_metadata(e).parent_id is None


def test_concurrent_reparenting_cannot_make_a_cycle(repo):
    for round_ in range(40):  # the race is probabilistic: many rounds make a miss unlikely
        a = repo.create_asset(meta(f"race-a-{round_}"), blob())
        b = repo.create_asset(meta(f"race-b-{round_}"), blob())
        barrier = threading.Barrier(2)

        def reparent(child: str, parent: str, barrier=barrier) -> str:
            barrier.wait()
            try:
                repo.update_asset(child, {"parent_id": parent})
                return "ok"
            except LineageCycle:
                return "cycle"

        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(pool.map(reparent, (a, b), (b, a)))
        parents = (repo.get_metadata(a).parent_id, repo.get_metadata(b).parent_id)
        assert parents != (b, a), f"round {round_}: a and b are each other's parent"
        assert outcomes == ["cycle", "ok"], f"round {round_}: {outcomes}"


def test_missing_lineage_references_write_nothing(repo, store):
    a = repo.create_asset(meta("root"), blob())
    rows, stored = count(repo), objects(store)
    for fields in ({"parent_id": "nope"}, {"derived_from": [a, "nope"]}):
        with pytest.raises(AssetNotFound):
            repo.create_asset(meta("orphan", **fields), blob(THRESHOLD * 2))
        with pytest.raises(AssetNotFound):
            repo.create_asset(meta("orphan-small", **fields), blob())
    with pytest.raises(AssetNotFound):
        repo.update_asset(a, {"parent_id": "nope"})
    with pytest.raises(AssetNotFound):
        repo.update_asset(a, {"derived_from": ["nope"]})
    assert count(repo) == rows
    assert objects(store) == stored
    assert found(repo, AssetQuery().with_name("orphan")) == set()
    m = repo.get_metadata(a)
    assert m.parent_id is None and list(m.derived_from) == []


def test_parent_change_making_a_cycle_is_refused(repo):
    a = repo.create_asset(meta("cyc-a"), blob())
    b = repo.create_asset(meta("cyc-b", parent_id=a), blob())
    c = repo.create_asset(meta("cyc-c", parent_id=b), blob())
    log = repo.get_audit_log(a)
    for target, parent in ((a, a), (a, b), (a, c), (b, c)):
        with pytest.raises(LineageCycle):
            repo.update_asset(target, {"parent_id": parent})
    assert repo.get_metadata(a).parent_id is None
    assert repo.get_metadata(b).parent_id == a
    assert repo.get_audit_log(a) == log
    lin = repo.get_lineage(c)
    assert [m.asset_id for m in lin["ancestors"]] == [b, a]


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


# -- access tracking --------------------------------------------------------------------
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


# -- bulk_create ------------------------------------------------------------------------
def test_bulk_create_matches_create_asset_rules(repo, store):
    rng = random.Random(7)
    types = ["kernel", "blueprint", "checkpoint"]
    pre_data = [blob(), blob(THRESHOLD * 2), blob()]
    existing = [repo.create_asset(meta(f"pre-{k}"), pre_data[k]) for k in range(3)]

    items: list[tuple[str, str, bytes]] = []  # (type, name, data)
    for i in range(500):
        if i % 11 == 0:
            k = i // 11 % 3
            items.append(("kernel", f"dup-of-pre-{i}", pre_data[k]))
        elif i % 7 == 0 and i > 7:
            t, _, d = items[rng.randrange(i)]
            items.append((t, f"dup-{i}", d))
        elif i % 17 == 0:
            t, _, d = items[rng.randrange(i)]
            items.append((next(x for x in types if x != t), f"cross-{i}", d))
        elif i % 13 == 0:
            items.append(("kernel", "pre-1", blob()))
        elif i % 5 == 0:
            items.append(("kernel", f"multi-{i % 3}", blob()))
        else:
            size = THRESHOLD + 500 if i % 40 == 1 else rng.randrange(8, 200)
            items.append((rng.choice(types), f"item-{i}", blob(size)))

    # The rules of create_asset, applied in input order.
    seen: dict[tuple[str, str], tuple] = {
        ("kernel", sha(d)): ("pre", k) for k, d in enumerate(pre_data)
    }
    series: dict[tuple[str, str], list] = {("kernel", f"pre-{k}"): [("pre", k)] for k in range(3)}
    expect: list[tuple] = []
    version_of: dict[tuple, tuple[int, tuple | None]] = {}
    for i, (t, name, d) in enumerate(items):
        key = seen.get((t, sha(d)))
        if key is None:
            key = seen[(t, sha(d))] = ("item", i)
            chain = series.setdefault((t, name), [])
            version_of[key] = (len(chain) + 1, chain[-1] if chain else None)
            chain.append(key)
        expect.append(key)

    created = repo.bulk_create([(meta(n, t), d) for t, n, d in items], actor="bulk")
    assert len(created) == len(items)

    def resolve(key: tuple | None) -> str | None:
        if key is None:
            return None
        return existing[key[1]] if key[0] == "pre" else created[key[1]]

    for i, key in enumerate(expect):
        assert created[i] == resolve(key), f"item {i}: {items[i][:2]}"
    new_keys = set(version_of)
    assert len({created[k[1]] for k in new_keys}) == len(new_keys)
    assert not {created[k[1]] for k in new_keys} & set(existing)
    assert count(repo) == 3 + len(new_keys)

    rows = {m.asset_id: m for m in everything(repo)}
    for key, (number, previous) in version_of.items():
        m = rows[created[key[1]]]
        t, name, d = items[key[1]]
        assert (m.asset_type, m.name, m.checksum, m.size_bytes) == (t, name, sha(d), len(d))
        assert m.version_number == number, f"item {key[1]}"
        assert m.previous_version_id == resolve(previous), f"item {key[1]}"
    assert rows[created[13]].version_number == 2  # first new version of pre-1
    assert rows[created[13]].previous_version_id == existing[1]
    assert max(m.version_number for m in rows.values() if m.name == "multi-0") >= 5

    for i in range(0, 500, 37):
        assert repo.get_asset(created[i])[1] == items[i][2], f"item {i}"
    for i in range(1, 500, 40):
        if expect[i] == ("item", i) and len(items[i][2]) > THRESHOLD:
            assert repo.get_asset(created[i])[1] == items[i][2]
            assert f"assets/{created[i]}" in objects(store, "assets/")
    first_new = min(k[1] for k in new_keys)
    log = repo.get_audit_log(created[first_new])
    assert (log[0]["event"], log[0]["actor"]) == ("created", "bulk")
    assert "duplicate" in events(repo, existing[0])


def test_bulk_created_assets_each_have_their_creation_event(repo):
    """A batch writes one "created" row in asset_events for all its assets; each asset's
    audit log still starts with its own creation event, as a single create's does."""
    parent = repo.create_asset(meta("audit-parent"), blob(), actor="solo")
    single = repo.get_audit_log(parent)
    assert [(e["event"], e["actor"]) for e in single] == [("created", "solo")]
    assert single[0]["details"] == {"name": "audit-parent", "version": "v1"}

    again = blob()
    items = [(meta(f"audit-{i % 7}", parent_id=parent), blob()) for i in range(40)]
    items.append((meta("audit-dup"), again))
    items.append((meta("audit-dup-2"), again))  # a duplicate within the batch
    with repo._db.read() as conn:
        before = repo._db.fetchall(conn, "SELECT count(*) FROM asset_events")[0][0]
    created = repo.bulk_create(items, actor="loader")
    with repo._db.read() as conn:
        after = repo._db.fetchall(conn, "SELECT count(*) FROM asset_events")[0][0]
    assert after - before == 2  # the batch's "created" row and the duplicate's event

    for (m, _), aid in zip(items[:41], created[:41], strict=True):
        log = repo.get_audit_log(aid)
        got = repo.get_metadata(aid)
        assert log[0]["event"] == "created" and log[0]["actor"] == "loader", aid
        assert log[0]["details"] == {"name": m.name, "version": got.version}, aid
        assert log[0]["at"] == got.created_at
    assert created[41] == created[40]
    assert events(repo, created[40]) == ["created", "duplicate"]
    assert repo.get_metadata(created[-1]).name == "audit-dup"

    # later events follow the batch's creation event, oldest first
    repo.deprecate_asset(created[3], "old", actor="carol")
    repo.update_asset(created[3], {"tags": {"t"}}, actor="bob")
    log = repo.get_audit_log(created[3])
    assert [(e["event"], e["actor"]) for e in log] == [
        ("created", "loader"), ("deprecated", "carol"), ("updated", "bob"),
    ]  # fmt: skip
    assert repo.get_audit_log(parent) == single  # a child's batch is not the parent's


def test_bulk_fast_checks_accept_what_create_accepts(repo):
    """The create path's fast checks must not refuse inputs the full checks allow."""

    class Name(str):
        pass

    parent = repo.create_asset(meta("lenient-parent"), blob())
    item = meta(
        Name("lenient"),
        tags=["b", "a", "b"],
        compilation_time_ms=7,
        derived_from=(parent,),
        expires_at=datetime(2100, 1, 1),  # naive: read as UTC
        properties={"n": 1},
    )
    items = [(item, bytearray(blob())), (meta("lenient-2", tags=frozenset({"x"})), blob())]
    for _ in range(16):  # past the COPY threshold (16 rows) too
        items.append((meta("lenient-3"), memoryview(blob())))
    ids_ = repo.bulk_create(items)
    got = repo.get_metadata(ids_[0])
    assert (got.name, got.tags, got.compilation_time_ms) == ("lenient", {"a", "b"}, 7)
    assert got.derived_from == [parent]
    assert got.expires_at == datetime(2100, 1, 1, tzinfo=UTC)
    assert repo.get_metadata(ids_[1]).tags == {"x"}
    assert [repo.get_metadata(i).version_number for i in ids_[2:]] == list(range(1, 17))


def test_bulk_create_of_many_distinct_names_in_one_batch(repo):
    """20,000 names: locking each one separately exhausted PostgreSQL's lock table
    ("out of shared memory") somewhere past 7,000; a big batch now takes one lock."""
    items = [(AssetMetadata("kernel", f"many-{i}"), f"many:{i}".encode()) for i in range(20_000)]
    ids = repo.bulk_create(items)
    assert len(set(ids)) == 20_000
    assert repo.get_usage_analytics()["by_type"]["kernel"] == 20_000
    assert repo.get_metadata(ids[-1]).version_number == 1


def test_bulk_create_with_a_bad_item_writes_nothing(repo, store):
    repo.create_asset(meta("before"), blob())
    rows, stored = count(repo), objects(store)
    good = [(meta(f"good-{i}"), blob(THRESHOLD * 2 if i % 2 else 50)) for i in range(10)]
    for bad in (
        (meta("bad-type", "model"), blob()),
        (meta("bad-tag", tags={"a,b"}), blob()),
        (meta("bad-data"), "not bytes"),
    ):
        with pytest.raises(InvalidInput):
            repo.bulk_create([*good[:5], bad, *good[5:]])
    with pytest.raises(AssetNotFound):
        repo.bulk_create([*good, (meta("bad-parent", parent_id="nope"), blob())])
    assert count(repo) == rows
    assert objects(store) == stored
    assert repo.bulk_create([]) == []


def test_bulk_create_label_conflict_writes_nothing(repo, store):
    repo.create_asset(meta("labelled", version="1.0"), blob())
    rows, stored = count(repo), objects(store)
    batch = [(meta(f"fine-{i}"), blob(THRESHOLD * 2 if i % 3 == 0 else 40)) for i in range(20)]
    with pytest.raises(AssetConflict):
        repo.bulk_create([*batch, (meta("labelled", version="1.0"), blob())])
    with pytest.raises(AssetConflict):  # within the batch
        repo.bulk_create(
            [(meta("twice", version="2"), blob()), *batch, (meta("twice", version="2"), blob())]
        )
    assert count(repo) == rows
    assert objects(store) == stored


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


# -- bad input --------------------------------------------------------------------------
LARGE = object()  # sentinel: a valid payload above the threshold
# (what, metadata fields, data, the InvalidInput subclass errors.py documents for it)
BAD_CREATES = [
    ("unknown type", {"asset_type": "model"}, LARGE, InvalidAssetField),
    ("unknown state", {"state": "deleted"}, LARGE, InvalidAssetField),
    ("empty tag", {"tags": {""}}, LARGE, InvalidAssetField),
    ("long tag", {"tags": {"x" * 65}}, LARGE, InvalidAssetField),
    ("comma tag", {"tags": {"a,b"}}, LARGE, InvalidAssetField),
    ("non-str tag", {"tags": {5}}, LARGE, InvalidAssetField),
    ("unprintable tag", {"tags": {"a\nb"}}, LARGE, InvalidAssetField),
    ("empty name", {"name": ""}, LARGE, InvalidAssetField),
    ("long name", {"name": "n" * 256}, LARGE, InvalidAssetField),
    ("unprintable name", {"name": "a\x00b"}, LARGE, InvalidAssetField),
    ("non-str name", {"name": 5}, LARGE, InvalidAssetField),
    ("object property", {"properties": {"x": object()}}, LARGE, InvalidAssetField),
    ("NaN property", {"properties": {"x": float("nan")}}, LARGE, InvalidAssetField),
    ("nested NaN property", {"properties": {"a": {"b": [float("nan")]}}}, LARGE, InvalidAssetField),
    ("list properties", {"properties": [1, 2]}, LARGE, InvalidAssetField),
    ("str properties", {"properties": "{}"}, LARGE, InvalidAssetField),
    ("long asset_id", {"asset_id": "i" * 256}, LARGE, InvalidAssetField),
    ("unprintable asset_id", {"asset_id": "a\x00b"}, LARGE, InvalidAssetField),
    ("non-str asset_id", {"asset_id": 5}, LARGE, InvalidAssetField),
    # the create path's fast checks must fall back to these refusals
    ("infinite compile time", {"compilation_time_ms": float("inf")}, LARGE, InvalidAssetField),
    ("NaN compile time", {"compilation_time_ms": float("nan")}, LARGE, InvalidAssetField),
    ("str compile time", {"compilation_time_ms": "5"}, LARGE, InvalidAssetField),
    ("str tags", {"tags": "abc"}, LARGE, InvalidAssetField),
    ("bad tag in a list", {"tags": ["ok", "a,b"]}, LARGE, InvalidAssetField),
    ("empty created_by", {"created_by": ""}, LARGE, InvalidAssetField),
    ("long version", {"version": "v" * 65}, LARGE, InvalidAssetField),
    ("non-str parent_id", {"parent_id": 5}, LARGE, InvalidAssetField),
    ("str derived_from", {"derived_from": "abc"}, LARGE, InvalidAssetField),
    ("non-datetime expires_at", {"expires_at": "tomorrow"}, LARGE, InvalidAssetField),
    ("oversize data", {}, b"\x01" * (MAX_BYTES + 1), InvalidValue),
    ("str data", {}, "text", InvalidValue),
    ("None data", {}, None, InvalidValue),
    ("int data", {}, 12, InvalidValue),
]


def test_bad_input_raises_and_writes_nothing(repo, store):
    repo.create_asset(meta("baseline"), blob(THRESHOLD * 2))
    rows, stored = count(repo), objects(store)
    failures = []
    for label, fields, data, expected in BAD_CREATES:
        fields = {"asset_type": "kernel", "name": f"bad {label}", **fields}
        payload = blob(THRESHOLD * 2) if data is LARGE else data
        try:
            repo.create_asset(AssetMetadata(**fields), payload)
        except InvalidInput as exc:
            if not isinstance(exc, expected):
                failures.append(f"{label}: {type(exc).__name__}, expected {expected.__name__}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{label}: accepted")
        if count(repo) != rows or objects(store) != stored:
            failures.append(f"{label}: something was written")
            rows, stored = count(repo), objects(store)
    assert failures == []


def test_edges_of_valid_input_are_accepted(repo):
    payload = blob(100)
    aid = repo.create_asset(
        meta("n" * 255, tags={"t" * 64}, asset_id="i" * 255, properties={"é": ["ü", None]}),
        payload,
    )
    assert aid == "i" * 255
    m, data = repo.get_asset(aid)
    assert data == payload and m.name == "n" * 255 and set(m.tags) == {"t" * 64}
    assert m.properties == {"é": ["ü", None]}
    biggest = blob(MAX_BYTES)
    big = repo.create_asset(meta("at-the-limit"), biggest)
    assert repo.get_asset(big)[1] == biggest
    uni = repo.create_asset(meta("héllo wörld ✓"), blob())
    assert found(repo, AssetQuery().with_name("héllo wörld ✓")) == {uni}


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
