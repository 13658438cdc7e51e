"""``GET /metrics`` of a real ``esper serve`` process: the text parses with the
Prometheus parser, the counters move when the cache is used, and with ``--workers 2``
a scrape (answered by either worker) sums both workers' counts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from esper_assets_tests.api.conftest import forget, seed
from esper_assets_tests.api.server import ApiServer, server_env
from esper_assets_tests.conftest import wait_until

TIMEOUT = httpx.Timeout(10.0)


def scrape(server) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    response = httpx.get(server.url + "/metrics", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def binary(server, kernel_id: str) -> bytes:
    response = httpx.get(f"{server.url}/api/v1/kernels/{kernel_id}/binary", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.content


def test_metrics_parse_and_move_with_the_cache(served):
    """The first read of a kernel loads it from a lower tier (a latency sample of that
    tier), the next ones are L1 hits; the repository's reads are counted too."""
    server, seeded = served
    before = scrape(server)
    assert value(before, "esper_cache_breaker_state", tier="l3") == 0  # closed
    assert not any("token" in str(key).lower() for key in before)
    kernel_id, data = next(iter(seeded.kernels.items()))
    for _ in range(5):
        assert binary(server, kernel_id) == data
    after = scrape(server)
    hits = value(after, "esper_cache_tier_hits_total", tier="l1")
    assert hits - value(before, "esper_cache_tier_hits_total", tier="l1") >= 4
    assert value(after, "esper_cache_loads_total") == value(before, "esper_cache_loads_total") + 1
    lower = [t for t in ("l2", "l3", "l4") if value(after, "esper_cache_tier_hits_total", tier=t)]
    assert lower, after
    count = "esper_cache_get_latency_seconds_count"
    assert value(after, count, tier=lower[0]) > value(before, count, tier=lower[0])
    assert value(after, "esper_cache_l1_bytes") >= len(data)
    assert value(after, "esper_cache_tier_read_bytes_total", tier=lower[0]) > 0
    missing = httpx.get(f"{server.url}/api/v1/kernels/k-none/binary", timeout=TIMEOUT)
    assert missing.status_code == 404
    cold = seed(seeded.env, {"cold": 1024}, in_cache=False)  # only the repository has it
    try:
        cold_id, cold_data = next(iter(cold.kernels.items()))
        assert binary(server, cold_id) == cold_data
    finally:
        forget(cold)
    last = scrape(server)
    reads = "esper_repository_reads_total"
    assert value(last, reads, op="read") == value(after, reads, op="read") + 1
    assert value(last, "esper_repository_read_latency_seconds_count", op="read") >= 1
    assert value(last, count, tier="miss") >= value(after, count, tier="miss") + 2


def test_metrics_sum_both_workers(tmp_path: Path, pg_url, redis_server_url):
    """``--workers 2`` on PostgreSQL + Redis: one kernel read over fresh connections until
    both workers have loaded it. Each worker loads an id once (then it is in its L1), so a
    scrape showing 2 loads of it, and every read counted, is the sum of both workers,
    whichever of them answers the scrape."""
    env = server_env(
        tmp_path / "home", ESPER_DATABASE_URL=pg_url, ESPER_REDIS_URL=redis_server_url,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"),
    )  # fmt: skip
    (tmp_path / "metrics").mkdir()
    seeded = seed(env, {"small": 4096})
    kernel_id, data = next(iter(seeded.kernels.items()))
    server = ApiServer(env, tmp_path / "serve.log", "--workers", "2")
    reads = 0
    try:
        with ThreadPoolExecutor(4) as pool:
            for _ in range(25):  # bounded: 25 rounds of 8 reads
                assert all(
                    b == data for b in pool.map(lambda _: binary(server, kernel_id), range(8))
                )
                reads += 8
                if value(scrape(server), "esper_cache_loads_total") >= 2:
                    break
        pids = {p.stem.rsplit("_", 1)[1] for p in (tmp_path / "metrics").glob("counter_*.db")}
        assert len(pids) == 2, pids

        def counted() -> bool:
            s = scrape(server)
            l1 = value(s, "esper_cache_tier_hits_total", tier="l1") + value(
                s, "esper_cache_tier_misses_total", tier="l1"
            )
            return value(s, "esper_cache_loads_total") == 2 and l1 >= reads

        wait_until(counted, "both workers' loads and reads in one scrape", 10.0)
        for _ in range(4):  # whichever worker answers, the same sums
            assert value(scrape(server), "esper_cache_loads_total") == 2
    finally:
        server.stop()
        forget(seeded)
    assert "Traceback" not in server.output()
