"""PersistentKernelCache against real tiers: waterfall reads, promotion, writes,
TTLs, eviction, large objects, compression, corruption repair, single-flight,
warming, statistics, invalidation and input validation.

Tiers are seeded and inspected through the cache's own tier objects
(``cache.tier("l1")`` .. ``"l4"``) and, where the point is the bytes at rest,
through the raw services (SQL, Redis, files, S3). Nothing is mocked.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from esper_assets.errors import EsperError, InvalidKernelId, InvalidValue
from esper_assets.storage import PersistentKernelCache
from esper_assets.storage.cache import framing
from esper_assets.storage.cache.framing import Codec
from esper_assets.storage.cache.slots import Pending
from esper_assets.storage.cache.tiers.memory import entry_charge
from esper_assets.storage.cache.tiers.objects import kernel_object_key
from esper_assets.storage.cache.tiers.sql import IN_OBJECT_STORE
from esper_assets.storage.objects import make_s3_client
from esper_assets_tests.conftest import BACKENDS, wait_until
from esper_assets_tests.storage.cache.conftest import decode, noise, sql

each_backend = pytest.mark.parametrize("backend", BACKENDS)


# -- helpers ----------------------------------------------------------------------
def lost_not_written(cache: PersistentKernelCache) -> None:
    """Forget the change-log rows our own SQL left: a row that a disk loses or damages
    leaves none, and the invalidation fence would (rightly) refuse to refill an id
    that a writer changed moments ago."""
    sql(cache, "DELETE FROM kernel_invalidations")


def l3_row(cache: PersistentKernelCache, kernel_id: str) -> tuple | None:
    """(data, object_key, compressed) of the L3 row, expired or not."""
    rows = sql(
        cache, "SELECT data, object_key, compressed FROM kernel_cache WHERE id = ?", (kernel_id,)
    )
    if not rows:
        return None
    data, object_key, compressed = rows[0]
    return (None if data is None else bytes(data)), object_key, bool(compressed)


def l3_value(cache: PersistentKernelCache, kernel_id: str) -> bytes | None:
    blob = cache.tier("l3").get(kernel_id)
    assert blob is not IN_OBJECT_STORE
    return None if blob is None else decode(cache, blob)


def l2_value(cache: PersistentKernelCache, kernel_id: str) -> bytes | None:
    blob = cache.tier("l2").get(kernel_id)
    return None if blob is None else decode(cache, blob)


def l4_value(cache: PersistentKernelCache, kernel_id: str) -> bytes | None:
    blob = cache.tier("l4").get(kernel_id)
    return None if blob is None else decode(cache, blob)


def raw_object(cache: PersistentKernelCache, kernel_id: str) -> bytes | None:
    """The L4 object's bytes, read from the directory or the S3 bucket itself."""
    key = kernel_object_key(kernel_id)
    c = cache.config
    if c.s3_bucket:
        client = make_s3_client(c.s3_endpoint_url)
        try:
            return client.get_object(Bucket=c.s3_bucket, Key=f"{c.s3_prefix}/{key}")["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    path = Path(c.object_store_path) / key
    return path.read_bytes() if path.exists() else None


def write_raw_object(cache: PersistentKernelCache, kernel_id: str, data: bytes) -> None:
    key = kernel_object_key(kernel_id)
    c = cache.config
    if c.s3_bucket:
        client = make_s3_client(c.s3_endpoint_url)
        client.put_object(Bucket=c.s3_bucket, Key=f"{c.s3_prefix}/{key}", Body=data)
    else:
        (Path(c.object_store_path) / key).write_bytes(data)


def forget_fast(cache: PersistentKernelCache, ids: list[str]) -> None:
    """Drop ids from L1 and L2 only, so the next read must come from L3/L4."""
    for kernel_id in ids:
        cache.tier("l1").delete(kernel_id)
    if "l2" in cache.tiers:
        cache.tier("l2").delete_many(ids, announce=False)


def flip(blob: bytes, at: int) -> bytes:
    damaged = bytearray(blob)
    damaged[at] ^= 0x5A
    return bytes(damaged)


def tier_stats(cache: PersistentKernelCache) -> dict:
    return cache.get_stats()["tiers"]


def pause_flusher(cache: PersistentKernelCache) -> None:
    """Stop the background write-back flusher, so the test decides when flush() runs."""
    cache.maintainer.stop()
    assert not cache.maintainer.running


def expected_tiers(cache: PersistentKernelCache, *names: str) -> list[str]:
    return sorted(n for n in names if n in cache.tiers)


# -- waterfall and promotion ------------------------------------------------------
@each_backend
def test_value_only_in_l3_is_read_and_promoted(make_cache, backend):
    cache = make_cache(backend)
    value = noise(3000, 1)
    cache.put("k", value)
    forget_fast(cache, ["k"])
    assert "k" not in cache.tier("l1")
    if "l2" in cache.tiers:
        assert cache.tier("l2").get("k") is None

    assert cache.get("k") == value

    assert cache.tier("l1").get("k") == value
    if "l2" in cache.tiers:
        assert l2_value(cache, "k") == value
        assert tier_stats(cache)["l2"]["misses"] == 1
    assert tier_stats(cache)["l3"]["hits"] == 1
    # the promoted copies now answer: no second L3 read
    cache.tier("l1").delete("k")
    assert cache.get("k") == value
    assert tier_stats(cache)["l3"]["hits"] == (1 if "l2" in cache.tiers else 2)


@each_backend
def test_value_only_in_l4_archive_is_promoted_to_every_tier(make_cache, backend):
    cache = make_cache(backend, archive_to_l4=True)
    value = noise(2000, 2)
    assert "l4" in cache.put("k", value)
    cache.tier("l3").delete_many(["k"])
    lost_not_written(cache)
    forget_fast(cache, ["k"])
    assert cache.tier("l3").get("k") is None
    assert l4_value(cache, "k") == value

    assert cache.get("k") == value

    assert cache.tier("l1").get("k") == value
    assert l3_value(cache, "k") == value
    if "l2" in cache.tiers:
        assert l2_value(cache, "k") == value
    stats = tier_stats(cache)
    assert stats["l3"]["misses"] == 1
    assert stats["l4"]["hits"] == 1


@each_backend
def test_get_many_returns_found_ids_only_and_promotes(make_cache, backend):
    cache = make_cache(backend)
    values = {f"k{i}": noise(500 + i, i) for i in range(3)}
    for kernel_id, value in values.items():
        cache.put(kernel_id, value)
    forget_fast(cache, list(values))

    got = cache.get_many(["k0", "nope", "k1", "k2", "k0"])

    assert got == values
    for kernel_id, value in values.items():
        assert cache.tier("l1").get(kernel_id) == value
        if "l2" in cache.tiers:
            assert l2_value(cache, kernel_id) == value
    stats = tier_stats(cache)
    assert (stats["l3"]["hits"], stats["l3"]["misses"]) == (3, 1)
    assert cache.get_many([]) == {}
    assert cache.get_many(["nope"]) == {}


# -- writes -------------------------------------------------------------------------
@each_backend
def test_write_through_put_lands_in_every_tier(make_cache, backend):
    cache = make_cache(backend, archive_to_l4=True)
    value = b"kernel weights " * 400
    written = cache.put("k", value, {"arch": "resnet", "layer": 3})

    assert written == expected_tiers(cache, "l1", "l2", "l3", "l4")
    assert cache.tier("l1").get("k") == value
    if "l2" in cache.tiers:
        assert l2_value(cache, "k") == value
    assert l3_value(cache, "k") == value
    assert l4_value(cache, "k") == value
    assert cache.tier("l3").metadata("k")["metadata"] == {"arch": "resnet", "layer": 3}
    entry = cache.get_entry("k")
    assert entry.value == value and entry.metadata == {"arch": "resnet", "layer": 3}


@each_backend
def test_write_through_without_archive_skips_l4(make_cache, backend):
    cache = make_cache(backend)
    value = noise(1000, 3)
    assert cache.put("k", value) == expected_tiers(cache, "l1", "l2", "l3")
    assert raw_object(cache, "k") is None
    assert l3_value(cache, "k") == value


@each_backend
def test_write_back_put_is_acknowledged_before_l3_has_it(make_cache, backend):
    cache = make_cache(backend, write_mode="write_back")
    pause_flusher(cache)
    value = noise(1500, 4)

    assert cache.put("k", value) == expected_tiers(cache, "l1", "l2")

    assert cache.tier("l3").get("k") is None
    assert l3_row(cache, "k") is None
    assert cache.get("k") == value
    cache.tier("l1").clear()
    assert cache.get("k") == value  # from the dirty set, L1 or not
    assert cache.get_many(["k", "nope"]) == {"k": value}
    assert cache.get_stats()["write_back"]["dirty"] == 1

    assert cache.flush() == 1

    assert l3_value(cache, "k") == value
    wb = cache.get_stats()["write_back"]
    assert (wb["dirty"], wb["flushed"], wb["dirty_bytes"]) == (0, 1, 0)
    assert cache.flush() == 0


@each_backend
def test_write_back_background_flusher_persists(make_cache, backend):
    cache = make_cache(backend, write_mode="write_back", write_back_interval_s=0.05)
    value = noise(800, 5)
    cache.put("k", value)
    wait_until(lambda: cache.tier("l3").get("k") is not None, "background flush of k")
    assert l3_value(cache, "k") == value
    wait_until(lambda: cache.get_stats()["write_back"]["dirty"] == 0, "dirty set emptied")


@each_backend
def test_write_back_close_flushes(make_cache, backend):
    cache = make_cache(backend, write_mode="write_back")
    pause_flusher(cache)
    values = {"a": noise(700, 6), "b": noise(900, 7)}
    for kernel_id, value in values.items():
        cache.put(kernel_id, value)
    assert cache.tier("l3").get("a") is None

    cache.close()

    reader = make_cache(backend)
    for kernel_id, value in values.items():
        assert l3_value(reader, kernel_id) == value


@each_backend
def test_write_back_newer_put_during_flush_is_not_lost(make_cache, backend, monkeypatch):
    cache = make_cache(backend, write_mode="write_back")
    pause_flusher(cache)
    old, new = noise(600, 8), noise(600, 9)
    cache.put("k", old)
    real_put_many = cache.tier("l3").put_many
    raced = []

    def put_many_while_a_newer_put_arrives(rows):
        if not raced:
            raced.append(True)
            cache.put("k", new)  # arrives after flush() took its batch, before it finishes
        real_put_many(rows)

    monkeypatch.setattr(cache.tier("l3"), "put_many", put_many_while_a_newer_put_arrives)

    assert cache.flush() == 1

    assert raced
    assert l3_value(cache, "k") == old  # the flush stored what it took...
    assert cache.get_stats()["write_back"]["dirty"] == 1  # ...and kept the newer put dirty
    assert cache.get("k") == new
    cache.tier("l1").clear()
    assert cache.get("k") == new
    assert cache.flush() == 1
    assert l3_value(cache, "k") == new
    assert cache.get_stats()["write_back"]["dirty"] == 0


# -- TTLs and cleanup ------------------------------------------------------------------
@each_backend
def test_l1_ttl_expires_entries(make_cache, backend, l1_clock):
    cache = make_cache(backend, l1_ttl_seconds=0.2)
    value = noise(500, 10)
    cache.put("k", value)
    l1_clock.advance(0.19)
    assert "k" in cache.tier("l1")  # L1's clock moves only when the test says so
    l1_clock.advance(0.02)
    assert "k" not in cache.tier("l1")
    assert cache.tier("l1").get("k") is None
    assert cache.get("k") == value  # the lower tiers still have it


def test_l2_ttl_is_the_configured_one(make_cache, redis_client):
    ttl_s = 600
    cache = make_cache("services", l2_ttl_seconds=ttl_s)
    assert "l2" in cache.put("k", noise(500, 11))
    pttl = redis_client.pttl(cache.tier("l2").prefix + "k")
    # Redis counts down from the configured TTL; half of it is a tolerance no test
    # run can use up (5 minutes), and the key must not be without a TTL (-1).
    assert ttl_s * 1000 // 2 < pttl <= ttl_s * 1000


def test_l2_ttl_expires_entries(make_cache, redis_client):
    cache = make_cache("services", l2_ttl_seconds=0.2)
    value = noise(500, 11)
    assert "l2" in cache.put("k", value)
    wait_until(lambda: cache.tier("l2").get("k") is None, "L2 key to expire")
    assert redis_client.exists(cache.tier("l2").prefix + "k") == 0
    assert cache.get("k") == value


@each_backend
def test_l3_ttl_and_cleanup(make_cache, backend):
    cache = make_cache(backend, l3_ttl_seconds=0.2)
    keeper = make_cache(backend)  # same L3, default TTL
    cache.put("short", noise(500, 12))
    keeper.put("long", noise(500, 13))
    wait_until(lambda: cache.tier("l3").get("short") is None, "L3 row to expire")
    assert l3_row(cache, "short") is not None  # expired, not yet removed

    removed = cache.cleanup()

    assert removed["l3"] == 1
    assert l3_row(cache, "short") is None
    assert l3_row(cache, "long") is not None
    assert cache.cleanup()["l3"] == 0


@each_backend
def test_l4_ttl_and_cleanup(make_cache, backend):
    cache = make_cache(backend, archive_to_l4=True, l4_ttl_seconds=0.2)
    value = noise(700, 14)
    cache.put("k", value)
    assert framing.unpack(cache.tier("l4").get("k")).expires_ms > 0
    wait_until(
        lambda: framing.unpack(cache.tier("l4").get("k")).expired(framing.now_ms()),
        "L4 object to expire",
    )

    removed = cache.cleanup()

    assert (removed["l4"], removed["l3"]) == (1, 0)
    assert raw_object(cache, "k") is None
    assert cache.cleanup()["l4"] == 0
    assert cache.get("k") == value  # L1 and L3 keep their own TTLs


@each_backend
def test_cleanup_of_expired_pointer_row_removes_its_object(make_cache, backend):
    cache = make_cache(backend, large_object_threshold=4096, l3_ttl_seconds=0.2)
    cache.put("big", noise(10_000, 15))
    assert raw_object(cache, "big") is not None
    wait_until(lambda: cache.tier("l3").get("big") is None, "pointer row to expire")

    assert cache.cleanup()["l3"] == 1

    assert raw_object(cache, "big") is None


# -- L1 eviction policies -----------------------------------------------------------
# After a, b, c are put, the same reads make each policy pick a different victim:
#   lru  evicts b (least recently used: a and c were read after it)
#   lfu  evicts c (read fewest times among the least frequent: a=2, b=4, c=2; c got there first)
#   fifo evicts a (first in, whatever was read since)
READS = ["b", "b", "b", "c", "a"]


@pytest.mark.parametrize("policy, victim", [("lru", "b"), ("lfu", "c"), ("fifo", "a")])
@each_backend
def test_eviction_policy(make_cache, backend, policy, victim):
    values = {k: noise(4000, i) for i, k in enumerate("abcd")}
    charge = entry_charge("a", values["a"])
    cache = make_cache(
        backend,
        eviction_policy=policy,
        admission=False,
        l1_size_mb=(3 * charge + charge // 2) / (1 << 20),  # room for exactly three
    )
    for k in "abc":
        cache.put(k, values[k])
    assert all(k in cache.tier("l1") for k in "abc")
    for k in READS:
        assert cache.get(k) == values[k]

    cache.put("d", values["d"])

    assert {k for k in "abcd" if k in cache.tier("l1")} == set("abcd") - {victim}
    l1 = cache.tier("l1").stats()
    assert (l1["evictions"], l1["policy"], l1["admission"]) == (1, policy, "off")
    assert cache.get(victim) == values[victim]  # evicted from L1 only


# -- large objects --------------------------------------------------------------------
@each_backend
def test_large_value_is_an_object_behind_a_pointer_row(make_cache, backend, redis_prefix):
    cache = make_cache(backend, large_object_threshold=4096)
    big = noise(10_000, 16)

    assert cache.put("big", big) == ["l1", "l3", "l4"]

    data, object_key, _ = l3_row(cache, "big")
    assert data is None
    assert object_key == kernel_object_key("big")
    assert cache.tier("l3").get("big") is IN_OBJECT_STORE
    assert decode(cache, raw_object(cache, "big")) == big
    if "l2" in cache.tiers:
        assert cache.tier("l2").get("big") is None
    cache.tier("l1").clear()
    assert cache.get("big") == big
    if "l2" in cache.tiers:
        assert cache.tier("l2").get("big") is None  # reads don't promote large values into Redis
    assert cache.get_entry("big").in_object_store is True

    # at the threshold exactly: still inline
    edge = noise(4096, 17)
    assert cache.put("edge", edge) == expected_tiers(cache, "l1", "l2", "l3")
    data, object_key, _ = l3_row(cache, "edge")
    assert (data is not None, object_key) == (True, None)
    assert raw_object(cache, "edge") is None


# -- compression ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "compression, enabled, codec",
    [("zstd", True, Codec.ZSTD), ("gzip", True, Codec.GZIP), ("zstd", False, Codec.NONE)],
)
@each_backend
def test_compression(make_cache, backend, compression, enabled, codec):
    cache = make_cache(backend, compression=compression, enable_compression=enabled)
    text = b"conv2d weights 0123456789 " * 400

    cache.put("text", text)

    data, _, compressed = l3_row(cache, "text")
    frame = framing.unpack(data)
    assert frame.codec is codec
    assert compressed is (codec is not Codec.NONE)
    if codec is not Codec.NONE:
        assert len(data) < len(text) // 4
    if "l2" in cache.tiers:
        assert framing.unpack(cache.tier("l2").get("text")).codec is codec
    forget_fast(cache, ["text"])
    assert cache.get("text") == text

    # incompressible and tiny values are stored raw whatever the codec
    for kernel_id, value in (("noise", noise(5000, 18)), ("tiny", b"t" * 100)):
        cache.put(kernel_id, value)
        assert framing.unpack(l3_row(cache, kernel_id)[0]).codec is Codec.NONE
        forget_fast(cache, [kernel_id])
        assert cache.get(kernel_id) == value


# -- corruption -------------------------------------------------------------------------
# Header: magic 2s | checksum Q | version B | codec B | created q | expires q
_AT = {"magic": 0, "checksum": 2, "version": 10, "codec": 11, "expires": 20}
assert framing.HEADER_SIZE == 28, "frame layout changed: update _AT"
DAMAGE = {
    "payload bit": lambda blob: flip(blob, framing.HEADER_SIZE + 10),
    "magic": lambda blob: flip(blob, _AT["magic"]),
    "checksum": lambda blob: flip(blob, _AT["checksum"] + 5),
    "version byte": lambda blob: flip(blob, _AT["version"]),
    "codec byte": lambda blob: flip(blob, _AT["codec"]),
    "expiry": lambda blob: flip(blob, _AT["expires"] + 6),
    "truncated header": lambda blob: blob[: framing.HEADER_SIZE - 1],
    "last byte cut": lambda blob: blob[:-1],
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_corrupt_l2_frame_is_repaired_from_l3(make_cache, redis_client, damage):
    cache = make_cache("services")
    value = b"weights " * 300  # compressed: damage reaches a zstd payload
    cache.put("k", value)
    key = cache.tier("l2").prefix + "k"
    redis_client.set(key, DAMAGE[damage](redis_client.get(key)), keepttl=True)
    cache.tier("l1").clear()

    assert cache.get("k") == value

    stats = tier_stats(cache)
    assert stats["l2"]["corruptions"] == 1
    assert stats["l3"]["hits"] == 1
    assert decode(cache, redis_client.get(key)) == value  # L2 holds a good frame again
    cache.tier("l1").clear()
    assert cache.get("k") == value
    stats = tier_stats(cache)
    assert (stats["l2"]["corruptions"], stats["l2"]["hits"], stats["l3"]["hits"]) == (1, 1, 1)


@each_backend
def test_corrupt_l3_frame_is_repaired_from_l4(make_cache, backend):
    cache = make_cache(backend, archive_to_l4=True)
    value = noise(2000, 19)
    cache.put("k", value)
    data, _, _ = l3_row(cache, "k")
    sql(cache, "UPDATE kernel_cache SET data = ? WHERE id = ?", (flip(data, 100), "k"))
    lost_not_written(cache)
    forget_fast(cache, ["k"])

    assert cache.get("k") == value

    stats = tier_stats(cache)
    assert stats["l3"]["corruptions"] == 1
    assert stats["l4"]["hits"] == 1
    assert decode(cache, l3_row(cache, "k")[0]) == value  # L3 holds a good frame again
    if "l2" in cache.tiers:
        assert l2_value(cache, "k") == value


@each_backend
def test_corrupt_only_copy_reads_as_a_miss_not_garbage(make_cache, backend):
    cache = make_cache(backend)
    cache.put("k", noise(2000, 20))
    data, _, _ = l3_row(cache, "k")
    sql(cache, "UPDATE kernel_cache SET data = ? WHERE id = ?", (flip(data, 50), "k"))
    forget_fast(cache, ["k"])

    assert cache.get("k") is None

    assert tier_stats(cache)["l3"]["corruptions"] == 1


@each_backend
def test_corrupt_l4_objects_are_detected(make_cache, backend):
    # L4 is the bottom tier: nothing below it can repair an object, so a damaged
    # archive copy must simply never be served, and a damaged sole copy reads as a miss.
    cache = make_cache(backend, archive_to_l4=True, large_object_threshold=4096)
    small, big = noise(1000, 21), noise(10_000, 22)
    cache.put("small", small)
    cache.put("big", big)
    for kernel_id in ("small", "big"):
        write_raw_object(cache, kernel_id, flip(raw_object(cache, kernel_id), 60))
    cache.tier("l1").clear()

    assert cache.get("small") == small  # L3's copy is good; the archive is not consulted
    assert cache.get("big") is None  # its only copy is damaged
    assert tier_stats(cache)["l4"]["corruptions"] == 1

    cache.put("big", big)  # a fresh put replaces the damaged object
    cache.tier("l1").clear()
    assert cache.get("big") == big
    assert decode(cache, raw_object(cache, "big")) == big


# -- single-flight, warming, statistics ------------------------------------------------
@each_backend
def test_concurrent_misses_share_one_load(make_cache, backend):
    cache = make_cache(backend)
    value = noise(5000, 23)
    cache.put("k", value)
    cache.tier("l1").clear()
    barrier = threading.Barrier(20)
    loads_before = cache.loads

    def read(_):
        barrier.wait(timeout=10)
        return cache.get("k")

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(read, range(20)))

    assert results == [value] * 20
    assert cache.loads == loads_before + 1
    stats = tier_stats(cache)
    assert sum(stats[t]["hits"] for t in cache.tiers if t != "l1") == 1


@each_backend
def test_warm_cache_reports_each_id_in_order(make_cache, backend):
    cache = make_cache(backend, archive_to_l4=True)
    values = {k: noise(600, i) for i, k in enumerate(["hot", "in_l2", "in_l3", "in_l4"])}
    for kernel_id, value in values.items():
        cache.put(kernel_id, value)
    forget_fast(cache, ["in_l3", "in_l4"])
    cache.tier("l3").delete_many(["in_l4"])
    cache.tier("l1").delete("in_l2")
    cache.tier("l3").delete_many(["in_l2"])
    order = ["in_l4", "nope", "hot", "in_l3", "in_l2"]

    report = cache.warm_cache(order)

    expected = [("in_l4", "l4"), ("nope", "missing"), ("hot", "l1"), ("in_l3", "l3")]
    # without L2 the L3 row was the only copy besides the archive
    expected.append(("in_l2", "l2" if "l2" in cache.tiers else "l4"))
    assert list(report.items()) == expected
    for kernel_id, value in values.items():
        assert cache.tier("l1").get(kernel_id) == value
    again = cache.warm_cache(order)
    assert list(again.items()) == [(k, "missing" if k == "nope" else "l1") for k in order]


@each_backend
def test_get_stats_fields(make_cache, backend):
    cache = make_cache(backend)
    assert cache.get_stats()["overall_hit_rate"] is None
    value = noise(500, 24)
    cache.put("k", value)
    for _ in range(64):  # L1 reads are timed one in 64
        assert cache.get("k") == value
    assert cache.get("nope") is None

    stats = cache.get_stats()

    assert (stats["requests"], stats["hits"], stats["misses"]) == (65, 64, 1)
    assert stats["overall_hit_rate"] == round(64 / 65, 4)
    assert sorted(stats["tiers"]) == sorted(cache.tiers)
    l1 = stats["tiers"]["l1"]
    assert (l1["hits"], l1["misses"]) == (64, 1)
    assert l1["p50_us"] > 0 and l1["p99_us"] >= l1["p50_us"]
    for name in cache.tiers[1:]:
        tier = stats["tiers"][name]
        for field in ("hits", "misses", "errors", "corruptions", "p50_us", "p99_us"):
            assert field in tier, (name, field)
        assert (tier["errors"], tier["corruptions"], tier["breaker"]) == (0, 0, "closed")
    below = "l2" if "l2" in cache.tiers else "l3"
    assert (stats["tiers"][below]["hits"], stats["tiers"][below]["misses"]) == (0, 1)
    assert stats["tiers"][below]["p50_us"] > 0
    assert stats["tiers"]["l3"]["writes"] == 1
    l4 = stats["tiers"]["l4"]
    assert (l4["hits"], l4["misses"], l4["p50_us"]) == (0, 0, None)  # a plain miss skips L4


# -- invalidation -----------------------------------------------------------------------
@each_backend
def test_invalidate_removes_from_every_tier(make_cache, backend):
    cache = make_cache(backend, archive_to_l4=True, large_object_threshold=4096)
    cache.put("small", noise(1000, 25))
    cache.put("big", noise(10_000, 26))
    for kernel_id in ("small", "big"):
        assert raw_object(cache, kernel_id) is not None

    cache.invalidate("small")
    cache.invalidate("big")

    for kernel_id in ("small", "big"):
        assert kernel_id not in cache.tier("l1")
        if "l2" in cache.tiers:
            assert cache.tier("l2").get(kernel_id) is None
        assert l3_row(cache, kernel_id) is None
        assert raw_object(cache, kernel_id) is None
        assert cache.get(kernel_id) is None
        assert cache.get_entry(kernel_id) is None
    cache.invalidate("never-stored")  # not an error
    assert tier_stats(cache)["l3"]["deletes"] == 3


# -- bad input ----------------------------------------------------------------------------
BAD_IDS = ["", "x" * 256, "a\nb", "a\x00b", "tab\there", 123, ["x"], None, b"bytes"]
BAD_VALUES = ["str", 5, None, [1, 2], 3.5]
BAD_METADATA = [
    {"x": object()},
    {"x": {1, 2}},
    {"x": b"raw"},
    {("tuple", "key"): 1},
    {"x": float("nan")},  # not JSON: PostgreSQL's jsonb and SQLite's json_valid refuse it
    "not a mapping",
    5,
]


def assert_nothing_stored(cache: PersistentKernelCache) -> None:
    assert cache.tier("l1").stats()["entries"] == 0
    for level in cache.tiers[1:]:
        assert cache.tier(level).size()["entries"] == 0, level
    assert cache.get_stats()["write_back"]["dirty"] == 0


@pytest.mark.parametrize("write_mode", ["write_through", "write_back"])
@each_backend
def test_bad_input_is_refused_and_stores_nothing(make_cache, backend, write_mode):
    cache = make_cache(backend, max_value_bytes=1000, write_mode=write_mode)
    refused = []

    def expect(error: type[EsperError], call, *args) -> None:
        try:
            call(*args)
        except error:
            return
        except Exception as exc:  # collected and reported below
            refused.append(f"{call.__name__}{args!r:.60}: {type(exc).__name__}: {exc}")
            return
        refused.append(f"{call.__name__}{args!r:.60}: accepted")

    for bad_id in BAD_IDS:
        expect(InvalidKernelId, cache.put, bad_id, b"value")
        expect(InvalidKernelId, cache.get, bad_id)
        expect(InvalidKernelId, cache.invalidate, bad_id)
    for bad_value in BAD_VALUES:
        expect(InvalidValue, cache.put, "k", bad_value)
    expect(InvalidValue, cache.put, "k", b"v" * 1001)
    for metadata in BAD_METADATA:
        expect(InvalidValue, cache.put, "k", b"value", metadata)

    assert refused == []
    assert_nothing_stored(cache)
    assert cache.get("k") is None
    assert issubclass(InvalidKernelId, ValueError) and issubclass(InvalidValue, ValueError)


@each_backend
def test_boundary_inputs_are_accepted(make_cache, backend):
    cache = make_cache(backend, max_value_bytes=1000)
    longest = "k" * 255
    cache.put(longest, b"v" * 1000)  # the longest id and the largest value allowed
    cache.put("buf", bytearray(b"from a bytearray"))
    cache.put("view", memoryview(b"from a memoryview"))
    cache.put("meta", b"m", {"nested": {"list": [1, 2.5, None, "s"]}})
    cache.tier("l1").clear()
    assert cache.get(longest) == b"v" * 1000
    assert cache.get("buf") == b"from a bytearray"
    assert cache.get("view") == b"from a memoryview"
    assert cache.get_entry("meta").metadata == {"nested": {"list": [1, 2.5, None, "s"]}}


@each_backend
def test_an_invalidated_id_is_not_refilled_into_l3_from_l4_within_the_fence(make_cache, backend):
    """A reader that fetched an archived copy from L4 just before an invalidation
    deleted it must not write it back into L3 (its promotion lands after the delete)."""
    cache = make_cache(backend, archive_to_l4=True)
    value = noise(2000, 31)
    cache.put("k", value)
    frame = framing.unpack(cache.tier("l4").get("k"))
    found = Pending.found("k", value, frame, large=False)
    late_copy = cache.slot("l3").row(found)  # what the reader holds
    cache.invalidate("k")

    cache.tier("l3").put_many([late_copy], fence_s=cache.config.invalidation_fence_s)
    assert l3_row(cache, "k") is None
    cache.tier("l3").put_many([late_copy], fence_s=0)  # once the fence has passed, it may
    assert l3_row(cache, "k") is not None
