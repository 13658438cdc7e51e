"""AssetRepository.bulk_create: the same rules as create_asset, one transaction,
one creation event per batch, on both backends.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from esper_assets.errors import (
    AssetConflict,
    AssetNotFound,
    InvalidInput,
)
from esper_assets.storage.repository import AssetMetadata
from esper_assets_tests.storage.repository.conftest import (
    THRESHOLD,
    blob,
    count,
    events,
    everything,
    meta,
    objects,
    sha,
)


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
    with repo.backend.read() as conn:
        before = repo.backend.fetchall(conn, "SELECT count(*) FROM asset_events")[0][0]
    created = repo.bulk_create(items, actor="loader")
    with repo.backend.read() as conn:
        after = repo.backend.fetchall(conn, "SELECT count(*) FROM asset_events")[0][0]
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
