"""The cache's public seams: its tiers and slots by level, breaker states, write-back's
pending values, the maintainer's work on demand, and dropping L1."""

from __future__ import annotations

import pytest

from esper_assets.storage.cache.tiers.memory import MemoryTier
from esper_assets.storage.cache.tiers.objects import ObjectTier
from esper_assets.storage.cache.tiers.redis import RedisTier
from esper_assets.storage.cache.tiers.sql import SqliteTier
from esper_assets_tests.conftest import BACKENDS
from esper_assets_tests.storage.cache.conftest import noise, sql


@pytest.mark.parametrize("backend", BACKENDS)
def test_tier_and_slot_by_level(make_cache, backend):
    cache = make_cache(backend)

    assert isinstance(cache.tier("l1"), MemoryTier)
    assert cache.slot("l1") is None  # L1 cannot fail: no breaker, no slot
    for level in cache.tiers[1:]:
        slot = cache.slot(level)
        assert (slot.level, slot.tier, slot.tier.name) == (level, cache.tier(level), level)
    assert isinstance(cache.tier("l4"), ObjectTier)
    if backend == "embedded":
        assert isinstance(cache.tier("l3"), SqliteTier)
        assert cache.tier("l2") is None and cache.slot("l2") is None
    else:
        assert isinstance(cache.tier("l2"), RedisTier)
    with pytest.raises(ValueError, match="l5"):
        cache.tier("l5")


def test_unconfigured_tiers_are_none(make_cache):
    cache = make_cache("embedded", l1_enabled=False, l4_enabled=False)
    assert cache.tiers == ["l3"]
    assert [cache.tier(level) for level in ("l1", "l2", "l4")] == [None, None, None]
    assert cache.breaker_states() == {"l3": "closed"}
    assert cache.wait_subscribed(0.01) is False  # no L1 to keep fresh, so no listener


@pytest.mark.parametrize("backend", BACKENDS)
def test_breaker_states_match_the_stats(make_cache, backend):
    cache = make_cache(backend)
    states = cache.breaker_states()
    assert list(states) == cache.tiers[1:]
    assert set(states.values()) == {"closed"}
    tiers = cache.get_stats()["tiers"]
    assert states == {name: tiers[name]["breaker"] for name in cache.tiers[1:]}


def test_pending_writes_and_maintain_now(make_cache):
    cache = make_cache("embedded", write_mode="write_back")
    cache.maintainer.stop()
    assert not cache.maintainer.running
    values = {"a": noise(300, 1), "b": noise(400, 2)}
    cache.put_many(values)
    for _ in range(3):
        cache.get("a")

    assert cache.pending_writes() == values
    assert cache.tier("l3").get("a") is None

    cache.maintain_now()  # flushes write-back and the access counts, in this thread

    assert cache.pending_writes() == {}
    assert cache.tier("l3").get("a") is not None
    counts = dict(sql(cache, "SELECT id, access_count FROM kernel_cache"))
    assert counts == {"a": 3, "b": 0}


def test_maintain_now_reads_the_change_log(make_cache):
    """Embedded (no Redis): another process's invalidation reaches L1 through L3's
    change log only, when the maintainer next looks."""
    reader = make_cache("embedded")
    reader.maintainer.stop()  # from here on, only maintain_now() looks
    writer = make_cache("embedded")
    writer.put("k", b"old")
    assert reader.get("k") == b"old"
    writer.invalidate("k")

    assert "k" in reader.tier("l1")  # nobody has looked at the log yet
    reader.maintain_now()

    assert "k" not in reader.tier("l1")
    assert reader.get("k") is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_clear_l1_keeps_the_other_tiers(make_cache, backend):
    cache = make_cache(backend)
    cache.put("k", b"value")
    assert "k" in cache.tier("l1")

    cache.clear_l1()

    assert cache.tier("l1").stats()["entries"] == 0
    assert cache.warm_cache(["k"]) == {"k": "l2" if "l2" in cache.tiers else "l3"}
