"""AssetRepository lineage: parents, ancestors and descendants, references that must
exist, and cycles refused (also under concurrency), on both backends.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from esper_assets.errors import (
    AssetNotFound,
    LineageCycle,
)
from esper_assets.storage.repository import AssetMetadata, AssetQuery
from esper_assets_tests.storage.repository.conftest import (
    THRESHOLD,
    blob,
    count,
    found,
    meta,
    objects,
)


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

    assert as_ids(repo.get_ancestry(d)) == [d, c, b, a]  # the asset, then nearest first
    assert as_ids(repo.get_ancestry(d, depth=2)) == [d, c, b]
    assert as_ids(repo.get_ancestry(a)) == [a]

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
