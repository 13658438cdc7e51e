"""L2 reads header and payload apart (RedisTier.get_parts): the payload reaches the
caller without being copied out of the frame, and is still verified. On real Redis."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from esper_assets.storage.cache import framing
from esper_assets_tests.storage.cache.conftest import decode, noise

SIZES = [0, 1, 4 << 10, 256 << 10, 1 << 20]


L2_ONLY = {"l1_enabled": False, "l3_enabled": False, "l4_enabled": False}


@pytest.mark.parametrize("size", SIZES)
def test_l2_hit_returns_the_value_as_bytes_at_every_size(make_cache, redis_client, size):
    cache = make_cache("services", **L2_ONLY)
    value = noise(size, seed=size)
    cache.put("k", value)
    key = cache.tier("l2").prefix + "k"

    parts = cache.tier("l2").get_parts("k")
    assert parts.joined() == redis_client.get(key)  # the stored frame, read in two parts
    got = cache.get("k")
    assert type(got) is bytes and got == value
    assert cache.get_stats()["tiers"]["l2"]["hits"] == 1


def test_get_parts_reads_absent_keys_and_fences_as_misses(make_cache, redis_client):
    cache = make_cache("services", **L2_ONLY)
    tier = cache.tier("l2")
    assert tier.get_parts("never-stored") is None
    redis_client.set(tier.prefix + "fenced", b"")  # what invalidate leaves behind
    assert tier.get_parts("fenced") is None
    assert cache.get("fenced") is None


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param(b"EK\x01", id="shorter than a header"),
        pytest.param(b"x" * framing.HEADER_SIZE, id="a header of junk"),
        pytest.param(b"EK" + bytes(26) + b"payload", id="zero checksum"),
    ],
)
def test_damaged_l2_frame_read_in_parts_is_a_miss_repaired_from_l3(
    make_cache, redis_client, stored
):
    cache = make_cache("services", l1_enabled=False, l4_enabled=False)
    value = noise(64 << 10)
    cache.put("k", value)
    key = cache.tier("l2").prefix + "k"
    redis_client.set(key, stored, keepttl=True)

    assert cache.get("k") == value

    stats = cache.get_stats()["tiers"]
    assert (stats["l2"]["corruptions"], stats["l3"]["hits"]) == (1, 1)
    assert decode(cache, redis_client.get(key)) == value  # discarded, and a good frame back


def test_flipped_payload_byte_of_a_large_frame_is_caught(make_cache, redis_client):
    cache = make_cache("services", l1_enabled=False, l4_enabled=False)
    value = noise(256 << 10)
    cache.put("k", value)
    key = cache.tier("l2").prefix + "k"
    damaged = bytearray(redis_client.get(key))
    damaged[-1000] ^= 0x01
    redis_client.set(key, bytes(damaged), keepttl=True)

    assert cache.get("k") == value
    assert cache.get_stats()["tiers"]["l2"]["corruptions"] == 1


def test_wrong_type_at_the_key_is_an_l2_error_and_leaves_the_pool_usable(make_cache, redis_client):
    # a high threshold: the breaker stays closed, so the next read asks L2 again
    cache = make_cache(
        "services", l1_enabled=False, l4_enabled=False, breaker_failure_threshold=100
    )
    cache.put("k", b"v" * 5000)
    key = cache.tier("l2").prefix + "k"
    redis_client.delete(key)
    redis_client.rpush(key, b"not a frame")  # GETRANGE fails inside EXEC: WRONGTYPE

    assert cache.get("k") == b"v" * 5000  # from L3
    assert cache.get_stats()["tiers"]["l2"]["errors"] == 1

    redis_client.delete(key)
    cache.put("k", b"w" * 5000)
    assert cache.get("k") == b"w" * 5000  # no reply left behind on a pooled connection
    stats = cache.get_stats()["tiers"]
    assert (stats["l2"]["hits"], stats["l2"]["errors"]) == (1, 1)


def test_get_parts_against_a_dead_server_is_tier_unavailable(make_cache):
    cache = make_cache(
        "services", **L2_ONLY, redis_url="redis://127.0.0.1:1/0", redis_timeout_s=0.05
    )
    cache.put("k", b"value")  # a pure cache without L2: stored nowhere durable
    assert cache.get("k") is None
    assert cache.get_stats()["tiers"]["l2"]["errors"] >= 1


# -- torn reads: header and payload are two commands ------------------------------------------
def torn_parts(cache, redis_client, old: bytes, new: bytes, atomic: bool):
    """Header of the frame of ``old``, payload of the frame of ``new`` (now stored)."""
    key = cache.tier("l2").prefix + "k"
    cache.put("k", old)
    head = redis_client.get(key)[: framing.HEADER_SIZE]
    cache.put("k", new)
    payload = redis_client.get(key)[framing.HEADER_SIZE :]
    return framing.FrameParts(head, payload, atomic)


def test_torn_read_is_read_again_atomically_not_called_corrupt(make_cache, redis_client):
    cache = make_cache("services", **L2_ONLY)
    old, new = noise(64 << 10, seed=1), noise(64 << 10, seed=2)
    parts = torn_parts(cache, redis_client, old, new, atomic=False)
    slot = cache.slot("l2")

    value, _ = cache._reads._decode(slot, "k", parts, framing.now_ms())

    assert value == new and parts.atomic  # what is stored now, from an atomic read
    assert cache.get_stats()["tiers"]["l2"]["corruptions"] == 0


def test_mismatch_in_an_atomic_read_is_corruption(make_cache, redis_client):
    cache = make_cache("services", **L2_ONLY)
    parts = torn_parts(cache, redis_client, b"a" * 5000, b"b" * 5000, atomic=True)

    assert cache._reads._decode(cache.slot("l2"), "k", parts, framing.now_ms()) is None
    assert cache.get_stats()["tiers"]["l2"]["corruptions"] == 1


def test_torn_read_of_a_key_gone_meanwhile_is_a_plain_miss(make_cache, redis_client):
    cache = make_cache("services", **L2_ONLY)
    parts = torn_parts(cache, redis_client, b"a" * 5000, b"b" * 5000, atomic=False)
    redis_client.delete(cache.tier("l2").prefix + "k")

    assert cache._reads._decode(cache.slot("l2"), "k", parts, framing.now_ms()) is None
    assert cache.get_stats()["tiers"]["l2"]["corruptions"] == 0


def test_readers_racing_a_writer_see_whole_values_only(make_cache):
    writer = make_cache("services", l1_enabled=False, l4_enabled=False)
    reader = make_cache(
        "services", l1_enabled=False, l4_enabled=False, redis_prefix=writer.tier("l2").prefix
    )
    values = [noise(128 << 10, seed=s) for s in range(3)]
    writer.put("k", values[0])
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            writer.put("k", values[i % 3])

    thread = threading.Thread(target=write)
    thread.start()
    try:
        seen = [reader.get("k") for _ in range(300)]
    finally:
        stop.set()
        thread.join()
    assert all(v in values for v in seen)
    assert reader.get_stats()["tiers"]["l2"]["corruptions"] == 0


# -- the idle connections of the read path ------------------------------------------------------
def test_idle_connection_closed_by_the_server_is_replaced_without_an_error(
    make_cache, redis_client
):
    cache = make_cache("services", **L2_ONLY)
    cache.put("k", b"v" * 5000)
    assert cache.get("k") == b"v" * 5000
    tier = cache.tier("l2")
    (idle,) = tier.idle_connections()
    idle.send_command("CLIENT", "ID")
    redis_client.client_kill_filter(_id=idle.read_response())  # as a server timeout would

    assert cache.get("k") == b"v" * 5000
    stats = cache.get_stats()["tiers"]["l2"]
    assert (stats["hits"], stats["errors"]) == (2, 0)
    assert len(tier.idle_connections()) == 1  # the pool may hand back the same object, reconnected


def test_threads_reading_at_once_each_get_a_connection_of_their_own(make_cache):
    cache = make_cache("services", **L2_ONLY)
    values = {f"k{i}": noise(20_000, seed=i) for i in range(8)}
    cache.put_many(values)
    barrier = threading.Barrier(4)

    def read(i: int) -> bool:
        barrier.wait()
        return all(cache.get(f"k{(i + j) % 8}") == values[f"k{(i + j) % 8}"] for j in range(200))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, range(4)))
    tier = cache.tier("l2")
    idle = tier.idle_connections()
    assert 1 <= len(idle) <= 4 and len(set(map(id, idle))) == len(idle)
    assert cache.get_stats()["tiers"]["l2"]["errors"] == 0


def test_get_many_reads_frames_skipping_absent_and_fenced_keys(make_cache, redis_client):
    cache = make_cache("services", **L2_ONLY)
    values = {f"k{i}": noise(3000, seed=i) for i in range(5)}
    cache.put_many(values)
    tier = cache.tier("l2")
    redis_client.set(tier.prefix + "fenced", b"")

    frames = tier.get_many([*values, "fenced", "never-stored"])

    assert frames == {k: redis_client.get(tier.prefix + k) for k in values}
    assert cache.get_many([*values, "fenced"]) == values
    assert len(tier.idle_connections()) == 1  # get_many and get_parts share the idle connections
