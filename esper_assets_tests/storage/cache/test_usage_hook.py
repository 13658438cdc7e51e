"""The cache tells a UsageRecorder what it served: L1 hits derived from its read counts,
the lower tiers as they answer, and the access counts still reach L3."""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest

from esper_assets.analytics import schema
from esper_assets.analytics.events import UsageRecorder
from esper_assets.storage.objects import DirectoryObjectStore
from esper_assets_tests.conftest import BACKENDS

L1_HITS = 130  # over 64: the 1-in-64 sampling times at least one


def flushed_rows(store: DirectoryObjectStore) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = {}
    for key, _, _ in store.list(schema.EVENTS_PREFIX):
        for r in pq.read_table(io.BytesIO(store.get(key))).to_pylist():
            rows[r["source"], r["id"], r["op"], r["tier"]] = r
    return rows


@pytest.fixture
def usage_store(tmp_path) -> DirectoryObjectStore:
    return DirectoryObjectStore(tmp_path / "usage")


@pytest.mark.parametrize("backend", BACKENDS)
def test_flushed_rows_show_l1_hits_and_the_lower_tier_that_answered(
    make_cache, usage_store, backend
):
    lower = "l2" if backend == "services" else "l3"
    with UsageRecorder(usage_store, flush_s=3600) as recorder:
        cache = make_cache(backend)
        cache.attach_usage(recorder)
        cache.put("k1", b"v" * 100)
        cache.clear_l1()
        assert cache.get("k1") == b"v" * 100  # from below, now in L1
        for _ in range(L1_HITS):
            assert cache.get("k1") is not None
        assert cache.get("absent") is None
        cache.clear_l1()
        assert cache.get_many(["k1", "absent"]) == {"k1": b"v" * 100}
        assert recorder.flush()
        rows = flushed_rows(usage_store)
        hits = rows["cache", "k1", "get", "l1"]
        assert hits["requests"] == L1_HITS
        assert hits["bytes"] == 0  # not counted on the hot path
        assert hits["latency_timed"] >= 1 and sum(hits["latency_hist"]) == hits["latency_timed"]
        from_below = rows["cache", "k1", "get", lower]
        assert (from_below["requests"], from_below["bytes"], from_below["latency_timed"]) == (
            1, 100, 1,
        )  # fmt: skip
        assert rows["cache", "absent", "get", "miss"]["requests"] == 1
        assert rows["cache", "k1", "get_many", lower]["requests"] == 1
        assert rows["cache", "absent", "get_many", "miss"]["requests"] == 1
        assert ("cache", "absent", "get", "l1") not in rows
        # The recorder saw the read counts first; L3's access counts still get all of them.
        assert cache.hottest(1) == ["k1"]


def test_without_a_recorder_access_counts_reach_l3_as_before(make_cache):
    cache = make_cache("embedded")
    cache.put("a", b"x")
    cache.put("b", b"y")
    for _ in range(3):
        assert cache.get("b") == b"y"
    assert cache.hottest(2) == ["b", "a"]


def test_closing_the_cache_hands_over_its_last_reads(make_cache, usage_store):
    with UsageRecorder(usage_store, flush_s=3600) as recorder:
        cache = make_cache("embedded")
        cache.attach_usage(recorder)
        cache.put("k", b"x")
        for _ in range(3):
            cache.get("k")
        cache.close()  # the maintainer's last take passes the counts on
    assert flushed_rows(usage_store)["cache", "k", "get", "l1"]["requests"] == 3
