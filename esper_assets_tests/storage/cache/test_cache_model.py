"""Stateful model test: PersistentKernelCache against a plain dict.

Hypothesis drives a cache through puts, reads, invalidations, L1 pressure, L1
expiry and (on the services backend) a Redis tier that dies and comes back. The
model is ``id -> latest value``: puts overwrite, invalidate deletes. Every read
must agree with it, whichever tier answers, and no tier may hold a value that
disagrees with it where a read could find it (L1, L2).

Two variants:

* embedded: SQLite file + object directory (no L2), fresh files per example;
* services: PostgreSQL schema (truncated per example) + a private redis-server
  (fresh key prefix per example; killed and restarted by rules) + S3 over moto's
  HTTP server (fresh object prefix per example).
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from esper_assets.storage import CacheConfig, PersistentKernelCache
from esper_assets.storage.cache import framing

pytestmark = pytest.mark.slow  # both runs of the state machine take 10-25 s

# A small pool so puts collide. Ids that stress key encodings: kernel_object_key
# maps "." to "%2E", so "a.b" and "a%2Eb" must stay distinct objects.
IDS = ["k0", "k1", "k2", "a.b", "a%2Eb", "x/y", "..", "ü ñ"]
THRESHOLD = 2048  # large_object_threshold: values above it live in L4 (pointer row in L3)
L1_TTL = 0.05
EXPIRY_SLEEP = 0.06

COMMON = {
    "l1_size_mb": 0.01,  # ~10 KiB: a few large values force eviction / admission refusals
    "l1_ttl_seconds": L1_TTL,
    "large_object_threshold": THRESHOLD,
    "redis_timeout_s": 0.1,
    "breaker_reset_s": 0.1,
}

_HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
# Each services example costs ~0.7 s (most of it close(): the invalidation listener
# polls every 0.5 s), embedded ones a few ms; together the file runs in ~30 s.
EMBEDDED_SETTINGS = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=_HEALTH
)
SERVICES_SETTINGS = settings(
    max_examples=30, stateful_step_count=30, deadline=None, suppress_health_check=_HEALTH
)


def _incompressible(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _compressible(byte: int, n: int) -> bytes:
    return bytes([byte]) * n


# Small raw values (incl. b""), medium compressible ones (stored zstd-framed inline),
# and large ones (> THRESHOLD: L4 object + L3 pointer), both incompressible and
# compressible (the threshold is on the raw size). Large values come from a seed so
# they don't eat Hypothesis' entropy buffer.
small_values = st.binary(max_size=48)
medium_values = st.builds(_compressible, st.integers(0, 255), st.integers(256, THRESHOLD))
large_values = st.one_of(
    st.builds(_incompressible, st.integers(0, 2**32 - 1), st.integers(THRESHOLD + 1, 4096)),
    st.builds(_compressible, st.integers(0, 255), st.integers(THRESHOLD + 1, 4096)),
)
values = st.one_of(small_values, small_values, medium_values, large_values)
ids = st.sampled_from(IDS)


class CacheModel(RuleBasedStateMachine):
    """Rules and invariants shared by both backends; subclasses build the cache."""

    def __init__(self) -> None:
        super().__init__()
        self.model: dict[str, bytes] = {}
        self.requests = 0  # ids asked for through get / get_many (deduplicated)
        self.misses = 0  # of those, ids the model does not hold
        self.cache = self.build_cache()

    def build_cache(self) -> PersistentKernelCache:  # pragma: no cover - abstract
        raise NotImplementedError

    def teardown(self) -> None:
        self.cache.close()

    # -- bookkeeping --------------------------------------------------------
    def asked(self, kernel_ids) -> None:
        for kernel_id in dict.fromkeys(kernel_ids):
            self.requests += 1
            self.misses += kernel_id not in self.model

    def is_large(self, value: bytes) -> bool:
        return len(value) > THRESHOLD

    # -- writes ---------------------------------------------------------------
    @rule(kernel_id=ids, value=values)
    def put(self, kernel_id: str, value: bytes) -> None:
        written = self.cache.put(kernel_id, value)
        self.model[kernel_id] = value
        assert "l3" in written, written
        assert ("l4" in written) == self.is_large(value), written

    @rule(items=st.lists(st.tuples(ids, values), min_size=1, max_size=4))
    def put_many(self, items: list[tuple[str, bytes]]) -> None:
        written = self.cache.put_many(items)
        for kernel_id, value in items:  # a repeated id: the last value wins
            self.model[kernel_id] = value
        assert "l3" in written, written

    @rule(kernel_id=ids)
    def invalidate(self, kernel_id: str) -> None:
        self.cache.invalidate(kernel_id)
        self.model.pop(kernel_id, None)

    # -- reads ----------------------------------------------------------------
    @rule(kernel_id=ids)
    def get(self, kernel_id: str) -> None:
        got = self.cache.get(kernel_id)
        self.asked([kernel_id])
        assert got == self.model.get(kernel_id), (
            f"get({kernel_id!r}) returned {_show(got)}, model holds {_show(self.model.get(kernel_id))}"
        )

    @rule(kernel_ids=st.lists(ids, max_size=6))
    def get_many(self, kernel_ids: list[str]) -> None:
        got = self.cache.get_many(kernel_ids)
        self.asked(kernel_ids)
        expected = {k: self.model[k] for k in kernel_ids if k in self.model}
        assert got.keys() == expected.keys(), (sorted(got), sorted(expected))
        for k, v in expected.items():
            assert got[k] == v, f"get_many: {k!r} returned {_show(got[k])}, model holds {_show(v)}"

    @rule(kernel_ids=st.lists(ids, min_size=1, max_size=4, unique=True))
    def warm_cache(self, kernel_ids: list[str]) -> None:
        report = self.cache.warm_cache(kernel_ids)
        for k in kernel_ids:
            assert (report[k] == "missing") == (k not in self.model), (k, report)

    # -- pressure, time -------------------------------------------------------
    @rule()
    def clear_l1(self) -> None:
        """Memory pressure: L1 forgets everything; the lower tiers must not."""
        self.cache.tier("l1").clear()

    @rule()
    def expire_l1(self) -> None:
        """Let every L1 entry outlive l1_ttl_seconds (the model does not change)."""
        time.sleep(EXPIRY_SLEEP)

    @rule()
    def cleanup(self) -> None:
        removed = self.cache.cleanup()
        # Only L1 entries have a TTL short enough to expire here.
        assert all(n <= 0 for tier, n in removed.items() if tier != "l1"), removed

    # -- invariants -------------------------------------------------------------
    @invariant()
    def stats_are_consistent(self) -> None:
        stats = self.cache.get_stats()
        assert stats["hits"] + stats["misses"] == stats["requests"], stats
        assert stats["requests"] == self.requests, (stats["requests"], self.requests)
        assert stats["misses"] == self.misses, (stats["misses"], self.misses)
        if stats["requests"]:
            assert 0 <= stats["overall_hit_rate"] <= 1, stats

    @invariant()
    def l1_within_bounds_and_never_stale(self) -> None:
        l1 = self.cache.tier("l1")
        entries, used = l1.snapshot()
        assert 0 <= used <= l1.max_bytes, (used, l1.max_bytes)
        assert used == sum(charge for _, _, charge in entries.values())
        now = time.monotonic()
        for k, (value, expires, _) in entries.items():
            if expires > now:
                assert self.model.get(k) == value, (
                    f"L1 holds {_show(value)} for {k!r}, model holds {_show(self.model.get(k))}"
                )


class ServicesModel(CacheModel):
    """Adds a Redis that dies and comes back; reads and puts must not notice."""

    redis_proc = None  # the private_redis fixture, set by the test

    def __init__(self) -> None:
        if self.redis_proc.proc is None:  # a previous example left it dead
            self.redis_proc.start()
        self.redis_up = True
        # Our own connection for inspecting L2, so we never touch the cache's pool.
        self.inspector = redis.Redis.from_url(self.redis_proc.url, socket_timeout=5)
        super().__init__()

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self.inspector.close()
            if not self.redis_up:
                self.redis_proc.start()
                self.redis_up = True

    @precondition(lambda self: self.redis_up)
    @rule()
    def kill_redis(self) -> None:
        self.redis_proc.stop()
        self.redis_up = False

    @precondition(lambda self: not self.redis_up)
    @rule()
    def restart_redis(self) -> None:
        self.redis_proc.start()  # empty: --save "" and no AOF
        self.redis_up = True

    @invariant()
    def l2_never_stale(self) -> None:
        """What other processes would read from Redis must be the model's value."""
        if not self.redis_up:
            return
        blobs = self.inspector.mget([self.cache.tier("l2").prefix + k for k in IDS])
        for k, blob in zip(IDS, blobs, strict=True):
            if not blob:  # None: absent; b"": the fence an invalidation leaves (a miss)
                continue
            value = self.cache.codecs.decode(framing.unpack(blob))
            assert self.model.get(k) == value, (
                f"L2 holds {_show(value)} for {k!r}, model holds {_show(self.model.get(k))}"
            )


def _show(value: bytes | None) -> str:
    if value is None:
        return "None"
    return f"<{len(value)} bytes {value[:8]!r}...>" if len(value) > 16 else repr(value)


def test_embedded_cache_matches_model(tmp_path) -> None:
    class Embedded(CacheModel):
        def build_cache(self) -> PersistentKernelCache:
            root = tmp_path / uuid.uuid4().hex  # fresh SQLite file and object dir per example
            return PersistentKernelCache(
                CacheConfig(
                    sqlite_path=str(root / "l3.sqlite3"),
                    object_store_path=str(root / "objects"),
                    **COMMON,
                )
            )

    run_state_machine_as_test(Embedded, settings=EMBEDDED_SETTINGS)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.s3
def test_services_cache_matches_model(pg_url, private_redis, s3_endpoint, s3_bucket) -> None:
    import psycopg

    class Services(ServicesModel):
        redis_proc = private_redis

        def build_cache(self) -> PersistentKernelCache:
            cache = PersistentKernelCache(
                CacheConfig(
                    postgres_url=pg_url,
                    redis_url=private_redis.url,
                    redis_prefix=f"esper:model:{uuid.uuid4().hex[:12]}:",
                    s3_bucket=s3_bucket,
                    s3_endpoint_url=s3_endpoint,
                    s3_prefix=f"model-{uuid.uuid4().hex[:12]}",
                    **COMMON,
                )
            )
            # The schema outlives examples; the table exists once the cache has migrated.
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("TRUNCATE kernel_cache")
            return cache

    run_state_machine_as_test(Services, settings=SERVICES_SETTINGS)
