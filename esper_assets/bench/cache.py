"""``esper bench cache``: the kernel cache against the raw clients, same run.

Each tier is measured in isolation (a cache with only that tier on) so the
figure is the cost of one tier hit through the public ``get``, compared with the
raw client fetching the very same stored bytes: cachetools for L1, a redis-py
GET for L2, a prepared psycopg (or sqlite3) SELECT for L3.
"""

from __future__ import annotations

import os
import platform
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from esper_assets.bench.scratch import postgres_schema
from esper_assets.bench.timing import Comparison, paired_medians, wall_ms
from esper_assets.errors import EsperError
from esper_assets.flows.wiring import open_cache
from esper_assets.settings import Settings
from esper_assets.storage import PersistentKernelCache
from esper_assets.storage.cache.tiers.memory import MemoryTier, entry_charge
from esper_assets.storage.cache.tiers.redis import connect, is_cluster_url

VALUE_BYTES = 4096
# Real compiled kernels are rarely 4 KiB: L2 is measured up to the large-object threshold
# (1 MiB by default; values above it skip L2).
L2_SIZES = (4 << 10, 64 << 10, 256 << 10, 1 << 20)
L2_TARGET = 1.25  # x raw GET, at every size
COLD_MANY_TARGET = 1.5  # x raw MGET


@dataclass
class BenchEnv:
    """Where the bench runs: the settings and cache config overrides its caches are
    built from (by the wiring), and raw clients for the same data."""

    label: str
    settings: Settings
    overrides: dict[str, Any]
    raw_l3: Callable[[str], bytes | None]
    raw_l2: Callable[[str], bytes | None] | None = None
    raw_l2_many: Callable[[list[str]], list] | None = None
    raw_l2_names: tuple[str, str] = ("redis-py GET", "redis-py MGET")
    notes: list[str] = field(default_factory=list)


@contextmanager
def bench_env(settings: Settings) -> Iterator[BenchEnv]:
    """Isolated namespaces on the configured services: a fresh PostgreSQL schema,
    a fresh Redis prefix, a temporary directory; all removed afterwards."""
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(TemporaryDirectory(prefix="esper-bench-")))
        overrides: dict[str, Any] = {
            "object_store_path": str(tmp / "objects"),
            "s3_bucket": None,  # the bench measures L1-L3; L4 stays a local directory
        }
        if settings.database_url:
            url = stack.enter_context(postgres_schema(settings.database_url))
            overrides["postgres_url"] = url
            raw_l3 = stack.enter_context(_postgres_reader(url))
            label = "services"
        else:
            overrides["sqlite_path"] = str(tmp / "bench.sqlite3")
            raw_l3 = _sqlite_reader(overrides["sqlite_path"])
            label = "embedded"
        if settings.redis_url and is_cluster_url(settings.redis_url):
            label += "-cluster"  # its own results file
        env = BenchEnv(label, settings, overrides, raw_l3)
        if settings.redis_url:
            env.overrides["redis_prefix"] = prefix = f"esper:bench:{uuid.uuid4().hex[:8]}:"
            stack.enter_context(_redis_raw(settings.redis_url, prefix, env))
        yield env


@contextmanager
def _postgres_reader(url: str) -> Iterator[Callable[[str], bytes | None]]:
    """A prepared SELECT of one stored value, on its own connection to ``url``."""
    import psycopg

    from esper_assets.storage.cache.tiers.sql import PostgresTier

    PostgresTier(url).close()  # applies migrations
    raw = psycopg.connect(url, autocommit=True, prepare_threshold=0)
    query = "SELECT data FROM kernel_cache WHERE id = %s"

    def read(key: str) -> bytes | None:
        row = raw.execute(query, (key,), binary=True).fetchone()
        return None if row is None else row[0]

    try:
        yield read
    finally:
        raw.close()


def _sqlite_reader(path: str) -> Callable[[str], bytes | None]:
    import sqlite3

    from esper_assets.storage.cache.tiers.sql import SqliteTier

    SqliteTier(path).close()  # applies migrations
    conn = sqlite3.connect(path, check_same_thread=False)

    def read(key: str) -> bytes | None:
        row = conn.execute("SELECT data FROM kernel_cache WHERE id = ?", (key,)).fetchone()
        return None if row is None else row[0]

    return read


@contextmanager
def _redis_raw(url: str, prefix: str, env: BenchEnv):
    """redis-py's own client on the same server or cluster: GET and MGET, or on a
    cluster GET and mget_nonatomic (MGET cannot span hash slots)."""
    client = connect(url)
    env.raw_l2 = lambda key: client.get(prefix + key)
    if is_cluster_url(url):
        env.raw_l2_many = lambda keys: client.mget_nonatomic([prefix + k for k in keys])
        env.raw_l2_names = ("redis-py cluster GET", "redis-py cluster mget_nonatomic")
    else:
        env.raw_l2_many = lambda keys: client.mget([prefix + k for k in keys])
    try:
        yield
    finally:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def _cache(env: BenchEnv, **overrides: Any) -> AbstractContextManager[PersistentKernelCache]:
    return open_cache(env.settings, **(env.overrides | overrides))


def _values(n: int, size: int) -> dict[str, bytes]:
    # Random bytes: like float weights they do not compress, so no codec flatters the figures.
    return {f"kernel-{i:06d}-{uuid.uuid4().hex[:16]}": os.urandom(size) for i in range(n)}


# -- measurements --------------------------------------------------------------------
def bench_l1(env: BenchEnv, rounds: int) -> Comparison:
    import cachetools

    with _cache(env) as cache:
        key, value = next(iter(_values(1, VALUE_BYTES).items()))
        cache.put(key, value)
        ttl = cachetools.TTLCache(maxsize=10_000, ttl=3600)
        ttl[key] = value
        lock = threading.Lock()

        def raw() -> bytes:
            with lock:
                return ttl[key]

        plain = {key: value}

        def locked_dict() -> bytes:
            with lock:
                return plain[key]

        ours, theirs = paired_medians(lambda: cache.get(key), raw, rounds, batch=200)
        _, floor = paired_medians(
            lambda: cache.get(key), locked_dict, max(10, rounds // 4), batch=200
        )
    ok = ours <= 2.0 and ours <= 1.5 * theirs
    note = f"plain dict + lock: {floor} us"
    return Comparison(
        "L1 hit p50", ours, theirs, "cachetools.TTLCache + lock", "<= 2 us and <= 1.5x", ok, note
    )


def _single_tier_hit(
    env: BenchEnv, raw: Callable[[str], object], rounds: int, size: int, **only: bool
) -> tuple[float, float]:
    """Median get() of one stored value through a cache with one tier on, vs ``raw``."""
    with _cache(env, **only) as cache:
        key, value = next(iter(_values(1, size).items()))
        cache.put(key, value)
        if cache.get(key) != value or raw(key) is None:
            raise EsperError(f"bench setup: {key} did not round-trip through {only}")
        return paired_medians(lambda: cache.get(key), lambda: raw(key), rounds, batch=20)


def bench_l2(env: BenchEnv, rounds: int, size: int = VALUE_BYTES) -> Comparison:
    """One L2 hit of a ``size``-byte value (incompressible, checksum verified) against a
    redis-py GET of the same stored frame (which neither verifies nor unframes)."""
    name, target = f"L2 hit p50 ({size // 1024} KiB)", f"<= {L2_TARGET}x"
    raw_name = env.raw_l2_names[0]
    if env.raw_l2 is None:
        return Comparison(
            name, None, None, raw_name, target, None, "skipped: ESPER_REDIS_URL not set"
        )
    ours, theirs = _single_tier_hit(
        env, env.raw_l2, rounds, size, l1_enabled=False, l3_enabled=False, l4_enabled=False
    )
    return Comparison(name, ours, theirs, raw_name, target, ours <= L2_TARGET * theirs)


def bench_cold_get_many(env: BenchEnv, rounds: int, n: int = 100) -> Comparison:
    """get_many of ``n`` 4 KiB ids that are in L2 only (L1 cleared before each call, so
    each is verified, decoded and promoted into L1) against one raw MGET of them."""
    name, target = f"cold get_many p50 ({n} x 4 KiB, L2)", f"<= {COLD_MANY_TARGET}x"
    raw_name = env.raw_l2_names[1]
    if env.raw_l2_many is None:
        return Comparison(
            name, None, None, raw_name, target, None, "skipped: ESPER_REDIS_URL not set"
        )
    with _cache(env) as cache:
        values = _values(n, VALUE_BYTES)
        cache.put_many(values)
        ids = list(values)

        def cold() -> dict[str, bytes]:
            cache.clear_l1()
            return cache.get_many(ids)

        if cold() != values:
            raise EsperError("bench setup: cold get_many did not return what was put")
        raw_many = env.raw_l2_many
        ours, theirs = paired_medians(cold, lambda: raw_many(ids), rounds, batch=2)
    note = "ours includes clear_l1() and the promotion into L1"
    return Comparison(name, ours, theirs, raw_name, target, ours <= COLD_MANY_TARGET * theirs, note)


def bench_l3(env: BenchEnv, rounds: int) -> Comparison:
    raw_label = "psycopg prepared SELECT" if env.settings.database_url else "sqlite3 SELECT"
    ours, theirs = _single_tier_hit(
        env, env.raw_l3, rounds, VALUE_BYTES, l1_enabled=False, l2_enabled=False, l4_enabled=False
    )
    if not env.settings.database_url:  # the target is stated against PostgreSQL
        note = (
            "target is for PostgreSQL; a ~4 us SQLite read makes fixed per-read overhead dominate"
        )
        return Comparison("L3 hit p50", ours, theirs, raw_label, "info", None, note)
    return Comparison("L3 hit p50", ours, theirs, raw_label, "<= 1.3x", ours <= 1.3 * theirs)


def bench_hot_gets(env: BenchEnv, repeats: int) -> dict[str, Any]:
    """1000 gets over 100 hot ids, by 4 threads and by get_many; plus a cold get_many."""
    with _cache(env) as cache:
        values = _values(100, VALUE_BYTES)
        cache.put_many(values)
        ids = list(values)
        trace = [ids[i % 100] for i in range(1000)]
        pool = ThreadPoolExecutor(max_workers=4)

        def threaded() -> None:
            chunks = [trace[i::4] for i in range(4)]
            for _ in pool.map(lambda chunk: [cache.get(k) for k in chunk], chunks):
                pass

        def batched() -> None:
            for i in range(10):
                cache.get_many(ids if i % 2 else ids[::-1])

        def cold() -> None:
            cache.clear_l1()
            for _ in range(10):
                cache.get_many(ids)
                cache.clear_l1()

        result = {
            "threads_4_ms": wall_ms(threaded, repeats),
            "get_many_10x100_ms": wall_ms(batched, repeats),
            "cold_get_many_10x100_ms": wall_ms(cold, max(3, repeats // 3)),
            "hit_rate_hot": None,
        }
        pool.shutdown()
        result["hit_rate_hot"] = cache.get_stats()["overall_hit_rate"]
        if env.raw_l2_many is not None:
            result["raw_redis_mget_10x100_ms"] = wall_ms(
                lambda: [env.raw_l2_many(ids) for _ in range(10)], 5
            )
    result["target"] = "hot 1000 gets <= 20 ms"
    result["ok"] = max(result["threads_4_ms"], result["get_many_10x100_ms"]) <= 20
    return result


def zipf_trace(n_ids: int, length: int, seed: int = 7) -> list[int]:
    cum = list(accumulate(1.0 / (i + 1) for i in range(n_ids)))
    return random.Random(seed).choices(range(n_ids), cum_weights=cum, k=length)


def hit_ratio(tier: MemoryTier, trace: list[int], value: bytes) -> float:
    hits = 0
    for i in trace:
        key = str(i)
        if tier.get(key) is None:
            tier.put(key, value)
        else:
            hits += 1
    return hits / len(trace)


def bench_zipf(n_ids: int, length: int) -> dict[str, Any]:
    """Hit ratio on Zipf(1.0) with L1 sized for 1% of the ids: TinyLFU vs LRU."""
    import cachetools

    trace = zipf_trace(n_ids, length)
    value = b"v" * 64
    capacity = n_ids // 100
    max_bytes = capacity * entry_charge(str(n_ids - 1), value)
    ours = hit_ratio(MemoryTier(max_bytes, None, "lru", admission=True), trace, value)
    lru = hit_ratio(MemoryTier(max_bytes, None, "lru", admission=False), trace, value)
    ref = cachetools.LRUCache(maxsize=capacity)
    ref_hits = 0
    for i in trace:
        if i in ref:
            ref_hits += 1
            ref[i]  # noqa: B018 - a read refreshes recency
        else:
            ref[i] = value
    gain = round((ours - lru) * 100, 2)
    return {
        "ids": n_ids,
        "requests": length,
        "capacity_entries": capacity,
        "tinylfu_hit_ratio": round(ours, 4),
        "lru_hit_ratio": round(lru, 4),
        "cachetools_lru_hit_ratio": round(ref_hits / length, 4),
        "gain_points": gain,
        "target": ">= LRU + 8 points",
        "ok": gain >= 8,
    }


def run(
    settings: Settings, quick: bool = False, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    rounds = 60 if quick else 300
    with bench_env(settings) as env:
        progress(f"backend: {env.label}")
        comparisons = []
        steps: list[tuple[str, Callable[[], Comparison]]] = [
            ("L1", lambda: bench_l1(env, rounds * 4))
        ]
        for size in L2_SIZES:  # fewer rounds above 128 KiB: each round is 20 reads a side
            l2_rounds = max(20, rounds * (128 << 10) // size) if size > 128 << 10 else rounds
            steps.append(
                (f"L2 {size // 1024} KiB", lambda s=size, r=l2_rounds: bench_l2(env, r, s))
            )
        steps += [
            ("cold get_many", lambda: bench_cold_get_many(env, rounds)),
            ("L3", lambda: bench_l3(env, rounds)),
        ]
        for step, fn in steps:
            progress(f"measuring {step} ...")
            comparisons.append(fn())
        progress("measuring 1000 gets over 100 hot ids ...")
        hot = bench_hot_gets(env, repeats=10 if quick else 30)
    progress("replaying a Zipf(1.0) trace ...")
    zipf = bench_zipf(100_000, 200_000 if quick else 1_000_000)
    return {
        "bench": "cache",
        "backend": env.label,
        "settings": settings.describe(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "value_bytes": VALUE_BYTES,
        "comparisons": [c.as_dict() for c in comparisons],
        "hot_gets": hot,
        "zipf": zipf,
    }
