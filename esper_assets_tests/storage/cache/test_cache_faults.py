"""PersistentKernelCache when real services fail: Redis killed and restarted, an
object store nobody listens for, PostgreSQL refusing writes or not there at all.

Reads must keep working from the tiers that are left, a dead tier must cost one
failure per breaker period rather than one per read, and a write the durable
tier did not confirm must raise and leave nothing readable behind.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import closing

import pytest

from esper_assets.errors import (
    DurableWriteError,
    EsperError,
    FlushError,
    TierUnavailable,
)
from esper_assets.storage import CacheConfig, PersistentKernelCache
from esper_assets.storage.cache import framing
from esper_assets.storage.cache.resilience import CircuitBreaker
from esper_assets_tests.conftest import BACKENDS, ManualClock, closed_port, wait_until
from esper_assets_tests.storage.cache.conftest import decode, noise

RESET_S = 0.2


def manual_breaker(cache: PersistentKernelCache, tier: str) -> ManualClock:
    """Give ``tier``'s circuit breaker (same settings) a clock that moves only when the
    test advances it: "tried once per breaker period" becomes an exact count instead
    of a bound that depends on how fast the machine ran the reads."""
    clock = ManualClock()
    config = cache.config
    cache.slot(tier).breaker = CircuitBreaker(
        config.breaker_failure_threshold, config.breaker_reset_s, clock=clock.monotonic
    )
    return clock


def dead_s3(monkeypatch) -> dict:
    """Config for an S3 endpoint on a port nobody listens on.

    Credentials are set so the client really tries the socket (without them boto3
    would fail before connecting, and the test would pass for the wrong reason).
    """
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return {
        "object_store_path": None,
        "s3_bucket": "esper-nobody-home",
        "s3_endpoint_url": f"http://127.0.0.1:{closed_port()}",
        "object_store_timeout_s": 0.5,
    }


# -- Redis dies and comes back ----------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgres"])
def l3_choice(request) -> dict:
    """L3 for caches built on the ``embedded`` base: its SQLite file, or PostgreSQL."""
    if request.param == "sqlite":
        return {}
    return {"postgres_url": request.getfixturevalue("pg_url")}


def test_dead_redis_is_skipped_and_used_again_after_restart(l3_choice, private_redis, make_cache):
    import redis

    cache = make_cache(
        "embedded",
        **l3_choice,
        redis_url=private_redis.url,
        redis_prefix="esper:faults:",
        breaker_reset_s=RESET_S,
    )
    assert cache.wait_subscribed(5)
    clock = manual_breaker(cache, "l2")
    values = {f"k{i}": noise(800, i) for i in range(20)}
    for kernel_id, value in values.items():
        assert "l2" in cache.put(kernel_id, value)

    private_redis.stop()

    below_l1, periods = 0, 3
    for _ in range(periods):
        for _ in range(3):
            cache.tier("l1").clear()  # every read below must go past L1
            for kernel_id, value in values.items():
                assert cache.get(kernel_id) == value  # served by L3
                below_l1 += 1
                assert cache.get(kernel_id) == value  # and now by L1
            assert cache.get("nope") is None
            below_l1 += 1
        clock.advance(RESET_S)  # one breaker period passes

    l2 = cache.get_stats()["tiers"]["l2"]
    assert l2["breaker"] == "open"
    # Every read that reached L2's turn either tried it (and failed) or skipped it...
    assert l2["errors"] + l2["skipped"] == below_l1
    # ...and it was tried once per breaker period, not once per read.
    assert l2["errors"] == periods
    assert l2["hits"] == 0
    assert cache.put("while-dead", b"still durable") == ["l1", "l3"]
    assert cache.health()["l2"]["status"] == "unavailable"

    private_redis.start()

    client = redis.Redis.from_url(private_redis.url)

    def l2_takes_a_put() -> bool:
        clock.advance(RESET_S)  # the breaker lets one probe through
        cache.put("after", b"back again")
        return client.get("esper:faults:after") is not None

    wait_until(l2_takes_a_put, "a put to reach the restarted Redis")
    client.close()
    assert cache.get_stats()["tiers"]["l2"]["breaker"] == "closed"
    assert "l2" in cache.put("after-2", b"x")
    cache.tier("l1").clear()
    hits_before = cache.get_stats()["tiers"]["l2"]["hits"]
    assert cache.get("after-2") == b"x"
    assert cache.get_stats()["tiers"]["l2"]["hits"] == hits_before + 1


def test_writes_missed_while_redis_was_frozen_never_come_back_stale(private_redis, make_cache):
    """A paused (not restarted) Redis keeps its old values. Puts and invalidates that
    skipped it while its breaker was open must not let those old values be served."""
    import os
    import signal

    import redis

    cache = make_cache(
        "embedded",
        redis_url=private_redis.url,
        redis_prefix="esper:frozen:",
        redis_timeout_s=0.1,
        breaker_reset_s=RESET_S,
    )
    cache.put("k", b"old")
    cache.put("gone", b"old")
    os.kill(private_redis.proc.pid, signal.SIGSTOP)
    try:
        cache.put("trip", b"x")  # times out: the L2 breaker opens
        assert cache.get_stats()["tiers"]["l2"]["breaker"] == "open"
        assert "l2" not in cache.put("k", b"new")  # skipped: Redis still holds b"old"
        cache.invalidate("gone")  # skipped too
    finally:
        os.kill(private_redis.proc.pid, signal.SIGCONT)
    client = redis.Redis.from_url(private_redis.url)
    assert client.get("esper:frozen:k") is not None  # the stale copy really is there
    time.sleep(RESET_S * 1.5)
    cache.tier("l1").clear()
    assert cache.get("k") == b"new"
    assert cache.get("gone") is None
    # Removed from L2, or fenced (b"") so that no late refill can bring the old value back.
    assert client.get("esper:frozen:gone") in (None, b"")
    blob = client.get("esper:frozen:k")
    assert not blob or framing.unpack(blob).payload == b"new"
    client.close()


# -- the object store is unreachable ---------------------------------------------------------
def test_unreachable_object_store(pg_url, make_cache, monkeypatch):
    cache = make_cache(
        "embedded", postgres_url=pg_url, large_object_threshold=4096, **dead_s3(monkeypatch)
    )
    manual_breaker(cache, "l4")  # never advanced: one breaker period, however slow the run
    small, big = noise(1000, 1), noise(10_000, 2)

    assert cache.put("small", small) == ["l1", "l3"]
    cache.tier("l1").clear()
    assert cache.get("small") == small

    with pytest.raises(DurableWriteError, match="NOT stored") as info:
        cache.put("big", big)
    assert isinstance(info.value.__cause__, TierUnavailable)
    assert cache.tier("l3").metadata("big") is None  # no pointer row to a missing object
    assert "big" not in cache.tier("l1")
    with pytest.raises(DurableWriteError):  # breaker open now: refused at once
        cache.put("big", big)
    assert cache.tier("l3").metadata("big") is None

    # reads never raise
    assert cache.get("big") is None
    assert cache.get_many(["big", "small"]) == {"small": small}
    assert cache.warm_cache(["big", "small"]) == {"big": "missing", "small": "l1"}
    assert cache.get_entry("big") is None
    assert cache.put("small-2", small) == ["l1", "l3"]
    assert cache.cleanup()["l4"] == -1
    stats = cache.get_stats()["tiers"]["l4"]
    assert stats["errors"] == 1 and stats["breaker"] == "open"
    assert cache.health()["l4"]["status"] == "unavailable"


def test_pointer_row_whose_object_store_is_unreachable_reads_as_a_miss(
    pg_url, make_cache, monkeypatch
):
    big = noise(10_000, 3)
    writer = make_cache("services", large_object_threshold=4096)
    writer.put("big", big)
    reader = make_cache(
        "embedded", postgres_url=pg_url, large_object_threshold=4096, **dead_s3(monkeypatch)
    )
    clock = manual_breaker(reader, "l4")

    for _ in range(20):
        assert reader.get("big") is None  # L3 points at L4, L4 cannot answer: a miss
    l4 = reader.get_stats()["tiers"]["l4"]
    assert (l4["errors"], l4["skipped"]) == (1, 19)  # one failure, then skipped

    clock.advance(reader.config.breaker_reset_s)  # a breaker period later: one probe
    for _ in range(5):
        assert reader.get("big") is None
    l4 = reader.get_stats()["tiers"]["l4"]
    assert (l4["errors"], l4["skipped"]) == (2, 23)
    assert writer.get("big") == big


# -- PostgreSQL refuses writes -------------------------------------------------------------
def test_read_only_postgres_refuses_write_through(
    pg_readonly_url, redis_prefix, redis_client, make_cache
):
    normal = make_cache("services", large_object_threshold=4096)  # applies the migrations
    old = noise(1200, 4)
    normal.put("old", old)
    cache = make_cache("services", postgres_url=pg_readonly_url, large_object_threshold=4096)

    for kernel_id, value in (("new", noise(1000, 5)), ("new-big", noise(10_000, 6))):
        with pytest.raises(DurableWriteError, match="NOT stored"):
            cache.put(kernel_id, value)
        assert kernel_id not in cache.tier("l1")
        assert cache.tier("l2").get(kernel_id) is None
        assert redis_client.exists(redis_prefix + kernel_id) == 0
        assert normal.tier("l3").metadata(kernel_id) is None

    # reads of what is already stored still work, from L3 itself
    cache.tier("l2").delete_many(["old"], announce=False)
    assert cache.get("old") == old
    stats = cache.get_stats()["tiers"]["l3"]
    assert stats["hits"] == 1 and stats["breaker"] == "closed"
    with pytest.raises(DurableWriteError):
        cache.invalidate("old")  # L3 could not delete it: the caller must know
    assert normal.tier("l3").get("old") is not None


def test_unreachable_postgres_at_construction(tmp_path):
    port = closed_port()
    url = f"postgresql://esper:s3cret-pw@127.0.0.1:{port}/esper"
    threads_before = set(threading.enumerate())

    with pytest.raises(TierUnavailable) as info:
        PersistentKernelCache(
            CacheConfig(
                postgres_url=url, sql_timeout_s=0.5, object_store_path=str(tmp_path / "objects")
            )
        )

    assert isinstance(info.value, EsperError)
    message = str(info.value)
    assert f"postgresql://esper:***@127.0.0.1:{port}/esper" in message
    assert "unreachable" in message
    chain, exc = [], info.value
    while exc is not None:
        chain.append(f"{exc!s} {exc!r}")
        exc = exc.__cause__ or exc.__context__
    assert not any("s3cret-pw" in text for text in chain)

    # It gives up: no connection pool left retrying in the background.
    def no_new_threads() -> bool:
        return not [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]

    wait_until(no_new_threads, "the failed cache's pool threads to stop")


# -- write-back when L3 refuses writes -----------------------------------------------------
def test_write_back_flush_error_keeps_values_readable(pg_readonly_url, make_cache):
    make_cache("services")  # applies the migrations
    cache = make_cache(
        "services",
        postgres_url=pg_readonly_url,
        write_mode="write_back",
        write_back_interval_s=0.05,
        l2_enabled=False,  # so the values below can only come from this process's memory
    )
    values = {"a": noise(700, 7), "b": noise(900, 8)}
    for kernel_id, value in values.items():
        assert cache.put(kernel_id, value) == ["l1"]

    with pytest.raises(FlushError, match="still held in memory"):
        cache.flush()

    cache.tier("l1").clear()
    for kernel_id, value in values.items():
        assert cache.get(kernel_id) == value
    assert cache.get_many(list(values)) == values
    wb = cache.get_stats()["write_back"]
    assert wb["dirty"] == 2 and wb["failures"] >= 1 and wb["flushed"] == 0
    with pytest.raises(FlushError):
        cache.close()
    assert cache.get("a") == values["a"]  # still open, still holding them
    assert cache.tier("l3").get("a") is None
    assert cache.pending_writes() == values
    # This L3 can never take them: drop them so the fixture can close the cache.
    assert cache.discard_pending_writes() == 2
    assert cache.pending_writes() == {}
    assert cache.get_stats()["write_back"]["dirty"] == 0


REFUSE = {
    "services": (
        "CREATE FUNCTION refuse_writes() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'writes refused by the test'; END $$;"
        " CREATE TRIGGER refuse_writes BEFORE INSERT OR UPDATE ON kernel_cache"
        " FOR EACH ROW EXECUTE FUNCTION refuse_writes()",
        "DROP TRIGGER refuse_writes ON kernel_cache",
    ),
    "embedded": (
        "CREATE TRIGGER refuse_insert BEFORE INSERT ON kernel_cache"
        " BEGIN SELECT RAISE(ABORT, 'writes refused by the test'); END;"
        " CREATE TRIGGER refuse_update BEFORE UPDATE ON kernel_cache"
        " BEGIN SELECT RAISE(ABORT, 'writes refused by the test'); END;",
        "DROP TRIGGER refuse_insert; DROP TRIGGER refuse_update;",
    ),
}


def l3_script(cache: PersistentKernelCache, script: str) -> None:
    if cache.config.postgres_url:
        import psycopg

        with psycopg.connect(cache.config.postgres_url, autocommit=True) as conn:
            conn.execute(script)
    else:
        with closing(sqlite3.connect(cache.config.sqlite_path, isolation_level=None)) as conn:
            conn.executescript(script)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_back_recovers_once_l3_takes_writes_again(make_cache, backend):
    cache = make_cache(backend, write_mode="write_back", write_back_interval_s=0.05)
    refuse, allow = REFUSE[backend]
    l3_script(cache, refuse)
    value = noise(1000, 9)
    cache.put("k", value)

    with pytest.raises(FlushError):
        cache.flush()
    with pytest.raises(FlushError):
        cache.close()
    cache.tier("l1").clear()
    assert cache.get("k") == value

    l3_script(cache, allow)
    cache.close()  # flushes what was held (unless the background flusher got there first)

    reader = make_cache(backend)
    assert decode(reader, reader.tier("l3").get("k")) == value
