"""What another writer can leave in the shared tiers, and what concurrent writers do
to each other: the cache must answer correctly and lose nothing."""

from __future__ import annotations

import threading

import pytest
import zstandard

from esper_assets.storage.cache import framing
from esper_assets.storage.cache.framing import Codec, Payload
from esper_assets.storage.cache.tiers.sql import PostgresTier, Row


def zstd_bomb(size: int) -> bytes:
    """zstd of ``size`` zero bytes, without ever holding them; the frame header states
    the size, so a decoder that trusts it allocates all of it at once."""
    out = zstandard.ZstdCompressor(level=1, write_content_size=True).compressobj(size=size)
    chunk = bytes(1 << 20)
    parts = [out.compress(chunk) for _ in range(size >> 20)]
    return b"".join(parts) + out.flush()


@pytest.mark.redis
def test_a_forged_l2_frame_that_inflates_past_max_value_bytes_is_a_corrupt_copy(
    make_cache, redis_client, redis_prefix
):
    """A frame with a valid checksum whose payload inflates to 256 MiB, in a cache whose
    values are at most 1 MiB: refused as corrupt (counted), and repaired from L3."""
    cache = make_cache("services", s3_bucket=None, max_value_bytes=1 << 20)
    cache.put("k", b"real value")
    bomb = framing.pack(Payload.of(Codec.ZSTD, zstd_bomb(256 << 20), 256 << 20), 1, 0)
    redis_client.set(redis_prefix + "k", bomb)
    cache.tier("l1").clear()

    assert cache.get("k") == b"real value"
    assert cache.get_stats()["tiers"]["l2"]["corruptions"] == 1
    repaired = redis_client.get(redis_prefix + "k")
    assert repaired != bomb  # the forged copy is gone (replaced or removed)


@pytest.mark.slow
@pytest.mark.postgres
def test_concurrent_l3_writers_and_access_flushes_do_not_deadlock(pg_url):
    """Two processes' worth of L3 traffic on the same ids, each side in the opposite
    order: batch upserts, access-count flushes and deletes. PostgreSQL aborts one
    side of a lock cycle with a deadlock error; none may happen."""
    tiers = [PostgresTier(pg_url) for _ in range(2)]
    ids = [f"k{i:03d}" for i in range(200)]
    rows = [
        Row(
            k,
            framing.pack(Payload.of(Codec.NONE, b"v", 1), 1, 0),
            None,
            {},
            1,
            30,
            False,
            1.0,
            None,
        )
        for k in ids
    ]
    tiers[0].put_many(rows)
    errors: list[BaseException] = []

    def traffic(tier: PostgresTier, order: list[str], rounds: int) -> None:
        counts = {k: 1 for k in order}  # dicts keep insertion order: the caller's order
        by_key = {r.key: r for r in rows}
        try:
            for _ in range(rounds):
                tier.record_access(counts)
                tier.put_many([by_key[k] for k in order])
        except BaseException as exc:  # collected: the assertion names it
            errors.append(exc)

    threads = [
        threading.Thread(target=traffic, args=(tiers[0], ids, 40)),
        threading.Thread(target=traffic, args=(tiers[1], ids[::-1], 40)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for tier in tiers:
        tier.close()
    assert not any(t.is_alive() for t in threads)
    assert errors == []
