"""L1 MemoryTier (esper_assets.storage.cache.tiers.memory).

Covers: get/put/delete/clear and their counters; TTL expiry (lazy on get, and
cleanup()); the victim chosen by each eviction policy (lru, lfu, fifo) with
admission off; values that can never fit; byte accounting on replacement; byte
accounting against real memory measured with tracemalloc; TinyLFU admission
beating plain LRU on a Zipf(1.0) trace; consistency of the byte bound under
8 threads.
"""

from __future__ import annotations

import gc
import itertools
import random
import sys
import threading
import tracemalloc

import pytest

from esper_assets.errors import ConfigError
from esper_assets.storage.cache.tiers.memory import ENTRY_OVERHEAD, MemoryTier, entry_charge

VALUE = b"v" * 100


def run_with_frequent_switches(hammer, threads: int) -> None:
    """Run ``hammer(seed)`` in ``threads`` threads at once, switching between them as
    often as the interpreter can (races show up in a few hundred operations)."""
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        started = [threading.Thread(target=hammer, args=(seed,)) for seed in range(threads)]
        for t in started:
            t.start()
        for t in started:
            t.join()
    finally:
        sys.setswitchinterval(switch_interval)


def tier_for(entries: int, policy: str = "lru", admission: bool = False, **kw) -> MemoryTier:
    """A tier into which exactly ``entries`` one-letter keys holding VALUE fit."""
    return MemoryTier(
        max_bytes=entries * entry_charge("a", VALUE), policy=policy, admission=admission, **kw
    )


def cached_keys(tier: MemoryTier, candidates: str) -> set[str]:
    return {k for k in candidates if k in tier}


# -- basics -------------------------------------------------------------------------------
def test_put_get_delete_clear():
    tier = MemoryTier(max_bytes=1 << 20)
    assert tier.put("k1", b"one") is True
    assert tier.put("k2", b"two") is True
    assert tier.get("k1") == b"one"
    assert tier.get("missing") is None

    assert tier.delete("k1") is True
    assert tier.delete("k1") is False
    assert tier.get("k1") is None
    assert tier.used_bytes == entry_charge("k2", b"two")

    tier.clear()
    assert tier.get("k2") is None
    assert tier.used_bytes == 0
    assert tier.stats()["entries"] == 0


def test_snapshot_shows_entries_expiry_and_charges(l1_clock):
    tier = MemoryTier(max_bytes=1 << 20, ttl_seconds=10)
    tier.put("a", b"one")
    tier.put("b", b"two", ttl_seconds=5)

    entries, used = tier.snapshot()

    assert entries == {
        "a": (b"one", l1_clock.now + 10, entry_charge("a", b"one")),
        "b": (b"two", l1_clock.now + 5, entry_charge("b", b"two")),
    }
    assert used == tier.used_bytes == sum(charge for _, _, charge in entries.values())
    l1_clock.advance(6)
    assert "b" in tier.snapshot().entries  # expired entries too, until a read or cleanup


def test_get_stores_and_returns_the_same_object_without_copying():
    value = bytes(4096)
    tier = MemoryTier(max_bytes=1 << 20)
    tier.put("k", value)
    assert tier.get("k") is value


def test_hit_and_miss_counters():
    tier = MemoryTier(max_bytes=1 << 20)
    tier.put("k", b"x")
    tier.get("k")
    tier.get("k")
    tier.get("nope")
    stats = tier.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (2, 1, 1)


def test_get_many_returns_only_found_keys():
    tier = MemoryTier(max_bytes=1 << 20)
    tier.put("a", b"1")
    tier.put("b", b"2")
    assert tier.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}


def test_unknown_policy_raises_config_error():
    with pytest.raises(ConfigError, match="eviction_policy"):
        MemoryTier(max_bytes=1000, policy="random")


# -- TTL (on a manual clock: time passes only when the test says so) -----------------------
def test_entry_expires_after_its_ttl(l1_clock):
    tier = MemoryTier(max_bytes=1 << 20, ttl_seconds=3600)
    tier.put("short", b"x", ttl_seconds=0.05)
    tier.put("long", b"y")
    l1_clock.advance(0.049)
    assert tier.get("short") == b"x"  # not yet
    l1_clock.advance(0.002)

    assert "short" not in tier
    assert tier.get("short") is None
    assert tier.get("long") == b"y"
    assert tier.stats()["expirations"] == 1
    assert tier.used_bytes == entry_charge("long", b"y")


def test_tier_default_ttl_applies_and_cleanup_drops_expired_entries(l1_clock):
    tier = MemoryTier(max_bytes=1 << 20, ttl_seconds=0.05)
    for key in "abc":
        tier.put(key, b"x")
    tier.put("forever", b"x", ttl_seconds=0)  # 0: no expiry
    l1_clock.advance(0.049)
    assert tier.cleanup() == 0
    l1_clock.advance(0.002)

    assert tier.cleanup() == 3
    assert tier.get("forever") == b"x"
    assert tier.used_bytes == entry_charge("forever", b"x")


def test_no_ttl_means_entries_never_expire(l1_clock):
    tier = MemoryTier(max_bytes=1 << 20, ttl_seconds=None)
    tier.put("k", b"x")
    l1_clock.advance(10 * 365 * 86400.0)
    assert tier.cleanup() == 0
    assert tier.get("k") == b"x"


# -- eviction policies (admission off) ------------------------------------------------------
def test_lru_evicts_least_recently_used():
    tier = tier_for(3, "lru")
    for key in "abc":
        tier.put(key, VALUE)
    tier.get("a")  # b is now least recently used
    tier.put("d", VALUE)
    assert cached_keys(tier, "abcd") == {"a", "c", "d"}
    assert tier.stats()["evictions"] == 1


def test_fifo_evicts_oldest_insert_even_if_recently_read():
    tier = tier_for(3, "fifo")
    for key in "abc":
        tier.put(key, VALUE)
    tier.get("a")
    tier.get("a")
    tier.put("d", VALUE)
    assert cached_keys(tier, "abcd") == {"b", "c", "d"}


def test_lfu_evicts_least_frequently_used():
    tier = tier_for(3, "lfu")
    for key in "abc":
        tier.put(key, VALUE)
    tier.get("a")
    tier.get("a")
    tier.get("c")  # frequencies: a=3, b=1, c=2
    tier.put("d", VALUE)
    assert cached_keys(tier, "abcd") == {"a", "c", "d"}


def test_lfu_breaks_ties_by_age():
    tier = tier_for(3, "lfu")
    for key in "abc":
        tier.put(key, VALUE)
    tier.get("a")  # b and c tie at 1; b is older
    tier.put("d", VALUE)
    assert cached_keys(tier, "abcd") == {"a", "c", "d"}


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_large_newcomer_evicts_as_many_victims_as_needed(policy):
    tier = tier_for(4, policy)
    for key in "abcd":
        tier.put(key, VALUE)
    big = b"B" * (len(VALUE) + entry_charge("a", VALUE))  # needs two slots
    assert tier.put("e", big) is True
    assert cached_keys(tier, "abcde") == {"c", "d", "e"}
    assert tier.used_bytes <= tier.max_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("admission", [True, False])
def test_value_larger_than_max_bytes_is_rejected(policy, admission):
    tier = tier_for(3, policy, admission)
    tier.put("a", VALUE)
    huge = bytes(tier.max_bytes)
    assert tier.put("huge", huge) is False
    assert tier.get("huge") is None
    assert tier.get("a") == VALUE  # nothing was evicted for a value that cannot fit
    assert tier.stats()["admission_rejections"] == 1
    assert tier.used_bytes == entry_charge("a", VALUE)


def test_replacing_a_key_keeps_byte_accounting_correct():
    tier = MemoryTier(max_bytes=1 << 20)
    tier.put("k", b"small")
    tier.put("other", b"o")
    tier.put("k", b"much larger value" * 10)
    tier.put("k", b"tiny")
    assert tier.get("k") == b"tiny"
    assert tier.used_bytes == entry_charge("k", b"tiny") + entry_charge("other", b"o")
    assert tier.stats()["entries"] == 2


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_replacing_a_key_in_a_full_tier_evicts_nobody(policy):
    tier = tier_for(3, policy, admission=True)
    for key in "abc":
        tier.put(key, VALUE)
    assert tier.put("b", b"w" * len(VALUE)) is True
    assert cached_keys(tier, "abc") == {"a", "b", "c"}
    assert tier.used_bytes == tier.max_bytes


# -- accounting against real memory ---------------------------------------------------------
def realistic_key(i: int, rng: random.Random) -> str:
    return f"kernel:blueprint-{i % 97:03d}/conv2d_3x3_s{i % 3}:sha256-{rng.getrandbits(128):032x}"


def traced_growth_of_filling(tier: MemoryTier, n: int, min_size: int, max_size: int) -> int:
    """Bytes of traced memory the tier holds after n put+get of fresh keys and values.

    Keys and values are created while tracing and afterwards referenced by the tier
    only, so the growth is exactly what the tier keeps alive.
    """
    rng = random.Random(2024)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            key = realistic_key(i, rng)
            assert tier.put(key, rng.randbytes(rng.randint(min_size, max_size)))
            assert tier.get(key) is not None  # fills the admission window like real reads
        del key
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_used_bytes_within_5_percent_of_real_memory(policy):
    tier = MemoryTier(max_bytes=1 << 40, policy=policy, admission=True)
    growth = traced_growth_of_filling(tier, 2000, 1024, 16 * 1024)
    assert tier.stats()["entries"] == 2000
    assert tier.used_bytes == pytest.approx(growth, rel=0.05)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("admission", [True, False])
def test_entry_overhead_matches_measured_per_entry_overhead(policy, admission):
    """With tiny values the per-entry overhead dominates; the 1-16 KiB test cannot see it."""
    n = 2000
    tier = MemoryTier(max_bytes=1 << 40, policy=policy, admission=admission)
    growth = traced_growth_of_filling(tier, n, 1, 64)
    keys_and_values = tier.used_bytes - n * ENTRY_OVERHEAD
    measured_overhead = (growth - keys_and_values) / n
    assert measured_overhead == pytest.approx(ENTRY_OVERHEAD, rel=0.2)


# -- TinyLFU admission ------------------------------------------------------------------------
def zipf_trace(n_keys: int, length: int, seed: int) -> list[str]:
    keys = [f"kernel:{i:05d}" for i in range(n_keys)]
    cum_weights = list(itertools.accumulate(1.0 / rank for rank in range(1, n_keys + 1)))
    return random.Random(seed).choices(keys, cum_weights=cum_weights, k=length)


def hit_ratio(trace: list[str], capacity: int, admission: bool) -> float:
    """Read-through: each miss fetches the value from below and offers it to L1."""
    value = bytes(1024)
    tier = MemoryTier(
        max_bytes=capacity * entry_charge(trace[0], value),  # all keys have the same length
        ttl_seconds=None,
        policy="lru",
        admission=admission,
    )
    hits = 0
    for key in trace:
        if tier.get(key) is not None:
            hits += 1
        else:
            tier.put(key, value)
    assert tier.stats()["entries"] == capacity
    return hits / len(trace)


def test_tinylfu_admission_beats_plain_lru_on_zipf_traffic():
    n_keys = 20_000
    trace = zipf_trace(n_keys, length=100_000, seed=42)
    capacity = n_keys // 100
    with_admission = hit_ratio(trace, capacity, admission=True)
    plain_lru = hit_ratio(trace, capacity, admission=False)
    assert with_admission - plain_lru >= 0.05, (with_admission, plain_lru)


def test_admission_keeps_popular_entry_against_one_hit_newcomer():
    tier = tier_for(2, "lru", admission=True)
    for key in "ab":
        tier.put(key, VALUE)
    for _ in range(3):
        tier.get("a")
        tier.get("b")
    tier.get("c")  # asked for once, then offered
    assert tier.put("c", VALUE) is False
    assert cached_keys(tier, "abc") == {"a", "b"}
    assert tier.stats()["admission_rejections"] == 1


def test_admission_lets_a_more_popular_newcomer_in():
    tier = tier_for(2, "lru", admission=True)
    for key in "ab":
        tier.put(key, VALUE)
    tier.get("a")
    tier.get("b")
    for _ in range(3):
        tier.get("c")
    assert tier.put("c", VALUE) is True
    assert cached_keys(tier, "abc") == {"b", "c"}


def test_admission_always_evicts_expired_victim(l1_clock):
    tier = tier_for(1, "lru", admission=True)
    tier.put("o", VALUE, ttl_seconds=0.05)
    for _ in range(5):
        assert tier.get("o") == VALUE  # popular, but about to expire
    assert tier.put("n", VALUE) is False  # while "o" is live, admission keeps it
    l1_clock.advance(0.06)
    assert tier.put("n", VALUE) is True
    assert cached_keys(tier, "on") == {"n"}


# -- threads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("admission", [True, False])
def test_byte_accounting_is_consistent_under_threads(policy, admission):
    keys = [f"kernel:{i:03d}" for i in range(64)]
    values = [bytes(size) for size in range(0, 4096, 64)]
    tier = MemoryTier(
        max_bytes=16 * entry_charge(keys[0], values[-1]), policy=policy, admission=admission
    )
    over_budget: list[int] = []
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(3000):
                key = rng.choice(keys)
                op = rng.random()
                if op < 0.5:
                    tier.put(key, rng.choice(values))
                elif op < 0.9:
                    tier.get(key)
                else:
                    tier.delete(key)
                if tier.used_bytes > tier.max_bytes:
                    over_budget.append(tier.used_bytes)
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    run_with_frequent_switches(hammer, threads=8)

    assert errors == []
    assert over_budget == []
    remaining = {k: v for k in keys if (v := tier.get(k)) is not None}
    assert tier.stats()["entries"] == len(remaining)
    assert tier.used_bytes == sum(entry_charge(k, v) for k, v in remaining.items())
    assert 0 < tier.used_bytes <= tier.max_bytes


# -- batches (a get_many's lookups and its promotion into L1) -------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
@pytest.mark.parametrize("admission", [True, False])
def test_put_many_and_get_many_behave_like_one_call_per_key(policy, admission):
    rng = random.Random(5)
    one, many = (MemoryTier(40_000, None, policy, admission=admission) for _ in range(2))
    for _ in range(30):  # more than fits: evictions and admission decisions on both
        batch = {
            f"k{rng.randrange(200)}": rng.randbytes(rng.randrange(100, 2000)) for _ in range(20)
        }
        stored = sum(one.put(k, v) for k, v in batch.items())
        assert many.put_many(batch) == stored
        keys = [f"k{rng.randrange(200)}" for _ in range(30)]
        expect = {k: v for k in keys if (v := one.get(k)) is not None}
        assert many.get_many(keys) == expect
    assert one.stats() == many.stats()
    assert one.used_bytes == many.used_bytes


def test_get_many_drops_expired_entries():
    tier = MemoryTier(1 << 20, 0.01, "lru", admission=False)
    assert tier.put_many({"a": b"1", "b": b"2"}) == 2
    assert tier.get_many(["a", "b", "c"]) == {"a": b"1", "b": b"2"}
    threading.Event().wait(0.05)
    assert tier.get_many(["a", "b"]) == {}
    stats = tier.stats()
    assert (stats["entries"], stats["expirations"], stats["misses"]) == (0, 2, 3)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_clear_forgets_entries_but_not_counters_or_admission_counts(policy):
    tier = tier_for(2, policy=policy, admission=True)
    tier.put_many({"a": VALUE, "b": VALUE})
    for _ in range(3):
        tier.get("a")
    tier.clear()
    assert (tier.used_bytes, tier.stats()["entries"], tier.get_many(["a", "b"])) == (0, 0, {})
    assert tier.stats()["hits"] == 3
    # the cleared tier fills and evicts as a fresh one, with "a" still popular
    assert tier.put_many({"a": VALUE, "c": VALUE}) == 2
    assert tier.put("d", VALUE) is False  # admission: no victim is less popular than "d"
    assert cached_keys(tier, "abcd") == {"a", "c"}
    assert tier.used_bytes == 2 * entry_charge("a", VALUE)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo"])
def test_clear_racing_batches_keeps_byte_accounting_consistent(policy):
    keys = [f"kernel:{i:03d}" for i in range(64)]
    tier = MemoryTier(max_bytes=16 * entry_charge(keys[0], VALUE), policy=policy)
    errors: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                batch = rng.sample(keys, 8)
                if rng.random() < 0.05:
                    tier.clear()
                elif rng.random() < 0.5:
                    tier.put_many(dict.fromkeys(batch, VALUE))
                else:
                    tier.get_many(batch)
        except BaseException as exc:  # reported to the main thread below
            errors.append(exc)

    run_with_frequent_switches(hammer, threads=6)
    assert errors == []
    snapshot = tier.snapshot()
    assert snapshot.used_bytes == sum(charge for _, _, charge in snapshot.entries.values())
    assert tier.used_bytes <= tier.max_bytes


class _Key(str):
    pass


class _Value(bytes):
    pass


@pytest.mark.parametrize(
    "key", ["", "a", "kernel-000001", "x" * 255, "é", "ü" * 300, "日本", "😀x", _Key("sub")]
)
@pytest.mark.parametrize(
    "value",
    [b"", b"x", bytes(4096), bytes(1 << 20), bytearray(b"abc"), memoryview(b"abcd"), _Value(b"z")],
    ids=lambda v: f"{type(v).__name__}-{len(v)}",
)
def test_entry_charge_is_getsizeof_of_key_and_value_plus_the_overhead(key, value):
    # computed from lengths for bytes and ASCII keys: it must be what getsizeof says
    assert entry_charge(key, value) == sys.getsizeof(key) + sys.getsizeof(value) + ENTRY_OVERHEAD
