"""A cold get_many's fast path (framing.raw_values, the batch promotion into L1) gives
what one get per id gives: the same values, the same counters per tier, the same
repairs of corrupt and expired copies, and L1 filled for the next reads. On real
PostgreSQL and Redis: get_many reads L2 with one MGET (whole frames, the batch check),
get with GETRANGEs (header and payload apart, the per-value check)."""

from __future__ import annotations

from esper_assets.storage.cache import framing
from esper_assets_tests.storage.cache.conftest import noise

KINDS = ("raw", "zstd", "expired_in_l2", "corrupt_in_l2", "junk_in_l2", "l3_only", "fenced")
ABSENT = "absent"
COUNTERS = ("hits", "misses", "corruptions", "errors", "bytes_read")


def expected_values() -> dict[str, bytes]:
    return {
        "raw": noise(4096, seed=1),  # incompressible: stored raw, the batch check takes it
        "zstd": b"compiled kernel " * 400,  # compressed: read the slow way
        "expired_in_l2": noise(4096, seed=2),
        "corrupt_in_l2": noise(4096, seed=3),
        "junk_in_l2": noise(4096, seed=4),
        "l3_only": noise(4096, seed=5),
    }


def stage(cache, redis_client, tag: str) -> dict[str, str]:
    """Store every kind under ids ending in ``tag``, then damage L2 as each kind says;
    returns kind -> id."""
    ids = {kind: f"{kind}-{tag}" for kind in (*KINDS, ABSENT)}
    for kind, value in expected_values().items():
        cache.put(ids[kind], value)
    cache.put(ids["fenced"], b"gone")
    cache.invalidate(ids["fenced"])  # a fence in L2, nothing below
    prefix = cache.tier("l2").prefix
    raw = expected_values()["expired_in_l2"]
    expired = framing.pack(framing.Payload.of(framing.Codec.NONE, raw, len(raw)), 1, 1)
    redis_client.set(prefix + ids["expired_in_l2"], expired, keepttl=True)
    stored = bytearray(redis_client.get(prefix + ids["corrupt_in_l2"]))
    stored[-1] ^= 1  # one payload bit
    redis_client.set(prefix + ids["corrupt_in_l2"], bytes(stored), keepttl=True)
    redis_client.set(prefix + ids["junk_in_l2"], b"EK\x01", keepttl=True)
    redis_client.delete(prefix + ids["l3_only"])
    cache.clear_l1()
    return ids


def counters(cache) -> dict[str, dict[str, int]]:
    stats = cache.get_stats()
    tiers = {level: {c: stats["tiers"][level][c] for c in COUNTERS} for level in ("l2", "l3")}
    return {**tiers, "cache": {"hits": stats["hits"], "misses": stats["misses"]}}


def delta(before: dict, after: dict) -> dict:
    return {t: {c: after[t][c] - before[t][c] for c in after[t]} for t in after}


def by_kind(ids: dict[str, str], found: dict[str, bytes]) -> dict[str, bytes]:
    return {kind: found[i] for kind, i in ids.items() if i in found}


def test_cold_get_many_reads_like_one_get_per_id(make_cache, redis_client):
    cache = make_cache("services")
    batch_ids, single_ids = stage(cache, redis_client, "many"), stage(cache, redis_client, "one")

    before = counters(cache)
    batch = cache.get_many(batch_ids.values())
    middle = counters(cache)
    single = {i: v for i in single_ids.values() if (v := cache.get(i)) is not None}
    after = counters(cache)

    assert by_kind(batch_ids, batch) == by_kind(single_ids, single) == expected_values()
    assert all(type(v) is bytes for v in batch.values())
    assert delta(before, middle) == delta(middle, after)
    assert delta(before, middle)["l2"]["corruptions"] == 2  # the flipped bit and the junk


def test_cold_get_many_repairs_l2_and_fills_l1(make_cache, redis_client):
    cache = make_cache("services")
    ids = stage(cache, redis_client, "many")
    cache.get_many(ids.values())

    tier, l1 = cache.tier("l2"), cache.tier("l1")
    for kind, value in expected_values().items():
        stored = redis_client.get(tier.prefix + ids[kind])
        assert cache.codecs.decode(framing.unpack(stored)) == value, kind  # repaired
        assert ids[kind] in l1, kind
    hits = l1.stats()["hits"]
    assert cache.get_many(ids.values()).keys() == {ids[k] for k in expected_values()}
    assert l1.stats()["hits"] == hits + len(expected_values())  # the second read: all L1


def test_get_many_after_an_invalidation_does_not_serve_the_old_value(make_cache):
    cache = make_cache("services")
    cache.put_many({"a": noise(4096, seed=1), "b": noise(4096, seed=2)})
    cache.clear_l1()
    assert cache.get_many(["a", "b"]).keys() == {"a", "b"}
    cache.invalidate("a")
    assert cache.get_many(["a", "b"]).keys() == {"b"}
    cache.clear_l1()
    assert cache.get_many(["a", "b"]).keys() == {"b"}
