"""``GET /metrics`` of a real ``esper serve`` process: the text parses with the
Prometheus parser, the counters move when the cache is used, and with ``--workers 2``
a scrape (answered by either worker) sums both workers' counts. The work of other
processes (repository writes, compiles, the landing zone's backlog) moves the metrics
derived from the records, and a repository that stops answering leaves /metrics up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from esper_assets.api.metrics import OPERATIONS, OperationTotals
from esper_assets.flows import wiring
from esper_assets.flows.kernels import build_kernel, ingest_blueprints
from esper_assets.settings import Settings
from esper_assets.storage import AssetMetadata
from esper_assets.storage.repository.tallies import SETTLE_S
from esper_assets_tests.api.conftest import forget, seed
from esper_assets_tests.api.server import ESPER, ApiServer, server_env
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
    # Every series the worker writes is there from the first scrape on, at 0: its files
    # were made when it started (not at a later sync: its open fds settle there too).
    for tier in ("l3", "miss"):
        assert ("esper_cache_get_latency_seconds_count", (("tier", tier),)) in before
    assert ("esper_repository_reads_total", (("op", "read"),)) in before
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


def worker_loads(metrics_dir: Path, scratch: Path) -> dict[str, float]:
    """Each worker's own ``esper_cache_loads_total`` by pid, read from its counter file
    alone (a copy, summed by prometheus-client's own collector)."""
    loads = {}
    for file in metrics_dir.glob("counter_*.db"):
        pid = file.stem.rsplit("_", 1)[1]
        alone = scratch / pid
        shutil.rmtree(alone, ignore_errors=True)
        alone.mkdir(parents=True)
        shutil.copyfile(file, alone / file.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        text = generate_latest(registry).decode()
        loads[pid] = sum(
            s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "esper_cache_loads_total"
        )  # fmt: skip
    return loads


def test_metrics_sum_both_workers(tmp_path: Path, pg_url, private_redis):
    """``--workers 2`` on PostgreSQL + Redis: one kernel read over fresh connections until
    each worker's own metric file shows a load of it. A scrape, whichever worker answers
    it, shows the sum of both files' loads (each >= 1, so no one worker's count is it)
    and counts every read. How many loads a worker makes is not fixed: single-flight
    shares a load between concurrent misses, not with a miss that comes just after. The
    Redis is the test's own (see conftest.backend_env)."""
    metrics_dir = tmp_path / "metrics"
    env = server_env(
        tmp_path / "home", ESPER_DATABASE_URL=pg_url, ESPER_REDIS_URL=private_redis.url,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )  # fmt: skip
    metrics_dir.mkdir()
    seeded = seed(env, {"small": 4096})
    kernel_id, data = next(iter(seeded.kernels.items()))
    server = ApiServer(env, tmp_path / "serve.log", "--workers", "2")
    reads = 0
    try:
        with ThreadPoolExecutor(4) as pool:

            def both_loaded() -> bool:  # 8 more reads, spread by the kernel's accept
                nonlocal reads
                assert all(b == data for b in pool.map(lambda _: binary(server, kernel_id),
                                                        range(8)))  # fmt: skip
                reads += 8
                loads = worker_loads(metrics_dir, tmp_path / "alone")
                return len(loads) == 2 and all(loads.values())

            # bounded: a worker starting late, or slow to sync its file, gets more reads
            wait_until(both_loaded, "each worker to load the kernel", 60.0)

        def summed() -> bool:
            s = scrape(server)
            l1 = value(s, "esper_cache_tier_hits_total", tier="l1") + value(
                s, "esper_cache_tier_misses_total", tier="l1"
            )
            loads = sum(worker_loads(metrics_dir, tmp_path / "alone").values())
            return value(s, "esper_cache_loads_total") == loads and l1 >= reads

        wait_until(summed, "both workers' loads and reads in one scrape", 10.0)
        loads = sum(worker_loads(metrics_dir, tmp_path / "alone").values())
        assert loads >= 2
        for _ in range(4):  # whichever worker answers, the same sums
            samples = scrape(server)
            assert value(samples, "esper_cache_loads_total") == loads
            assert operations(samples)["created"] == 2  # the seeded blueprint and kernel
    finally:
        server.stop()
        forget(seeded)
    assert "Traceback" not in server.output()


# -- work done in other processes, derived from the records -------------------------------
RECORDS_WAIT_S = 15.0  # bounded polling: the server looks at the records every ~2 s


def blueprint_file(name: str, width: int = 8) -> bytes:
    return json.dumps({
        "name": name, "version": "1.0.0", "input_shape": [4],
        "layers": [{"op": "linear", "out_features": width}, {"op": "relu"}],
    }).encode()  # fmt: skip


def wait_for(server, what: str, condition) -> dict:
    """Scrape until ``condition(samples)`` holds (bounded); the last samples."""
    seen: list[dict] = []

    def holds() -> bool:
        seen.append(scrape(server))
        return bool(condition(seen[-1]))

    wait_until(holds, what, RECORDS_WAIT_S)
    return seen[-1]


def operations(samples) -> dict[str, float]:
    return {
        dict(labels)["op"]: n
        for (name, labels), n in samples.items()
        if name == "esper_repository_operations_total"
    }


def test_repository_operations_count_writes_of_other_processes(backend_env, start_server):
    """Writes made by this test process (not the server) show in the server's counter
    of each operation, read from the audit trail; labels are operation names only."""
    server = start_server(backend_env)
    before = wait_for(server, "the repository's records", lambda s: operations(s))
    assert value(before, "esper_metrics_source_up", source="repository") == 1
    settings = Settings.from_env(backend_env)
    with wiring.open_repository(settings) as repo:
        meta = AssetMetadata(asset_type="blueprint", name=f"ops-{uuid.uuid4().hex[:8]}",
                             version="1.0.0")  # fmt: skip
        asset_id = repo.create_asset(meta, b'{"a": 1}')
        repo.create_asset(meta, b'{"a": 1}')  # the same content again: a duplicate
        repo.update_asset(asset_id, {"tags": {"metrics-test"}})
        repo.deprecate_asset(asset_id, "a test")
    moved = {"created": 1, "duplicate": 1, "updated": 1, "deprecated": 1}
    expected = {op: operations(before)[op] + moved.get(op, 0) for op in operations(before)}
    after = wait_for(server, "the writes counted", lambda s: operations(s) == expected)
    assert set(operations(after)) == set(OPERATIONS)
    assert value(after, "esper_metrics_collect_errors_total", source="repository") == 0


def pending(samples) -> bool:
    """One file pending, for a while already (the lag > 0)."""
    return value(samples, "esper_pipeline_landing_pending_files") == 1 and (
        value(samples, "esper_pipeline_landing_lag_seconds") > 0
    )


def pipeline(samples) -> tuple[float, float, float, float]:
    """(pending files, lag seconds, compiles, compile seconds summed)."""
    return (
        value(samples, "esper_pipeline_landing_pending_files"),
        value(samples, "esper_pipeline_landing_lag_seconds"),
        value(samples, "esper_pipeline_compile_seconds_count"),
        value(samples, "esper_pipeline_compile_seconds_sum"),
    )


def test_landing_lag_and_compile_time_move_through_the_flows(backend_env, start_server):
    """A landed blueprint is pending (lag > 0) until it is ingested and compiled, by
    this process through the flows; then the lag is 0 and one more compile is counted.
    A file that cannot be parsed is counted apart and kept out of the lag."""
    settings = Settings.from_env(backend_env)
    landing = wiring.landing_zone(settings)  # makes blueprints/: the server watches it
    server = start_server(backend_env)
    before = wait_for(server, "an empty backlog", lambda s: pipeline(s)[:2] == (0, 0))
    assert value(before, "esper_metrics_source_up", source="landing") == 1
    landing.put("metrics_mlp.json", blueprint_file("metrics_mlp"))
    landing.put("broken.json", b"{not json")
    waiting = wait_for(server, "the file pending", pending)
    assert value(waiting, "esper_pipeline_landing_invalid_files") == 1
    store = wiring.object_store(settings)
    with (
        wiring.open_repository(settings, store) as repo,
        wiring.open_cache(settings, store) as cache,
    ):
        (ingested,) = ingest_blueprints(repo, landing, ["metrics_mlp"])
        assert ingested.valid, ingested.problems
        assert build_kernel(repo, cache, ingested.asset_id).compiled
    compiles = pipeline(before)[2] + 1
    after = wait_for(server, "the kernel built", lambda s: pipeline(s)[:3] == (0, 0, compiles))
    assert pipeline(after)[3] > pipeline(before)[3]
    buckets = [
        n for (name, _), n in after.items() if name == "esper_pipeline_compile_seconds_bucket"
    ]
    assert max(buckets) == compiles  # the +Inf bucket holds every compile


@pytest.mark.slow
def test_landing_lag_through_esper_ingest(tmp_path: Path, start_server):
    """The embedded default end to end: a file landed, ``esper ingest`` (the sensor and
    its run, in another process) takes it to a kernel. A server started afterwards finds
    it done (its kernel is newer than the file), and a touched file (same content, a new
    version newer than the kernel) is parsed, found compiled, and stays done."""
    env = server_env(tmp_path / "home")
    landing = wiring.landing_zone(Settings.from_env(env))
    server = start_server(env)
    landing.put("ingested_mlp.json", blueprint_file("ingested_mlp", width=6))
    wait_for(server, "the file pending", pending)
    ingest = subprocess.run([str(ESPER), "ingest", "--json"], env=env, capture_output=True,
                            text=True, timeout=240)  # fmt: skip
    assert ingest.returncode == 0, (ingest.stdout, ingest.stderr)
    done = wait_for(server, "the kernel built", lambda s: pipeline(s)[:2] == (0, 0))
    assert pipeline(done)[2] == 1
    fresh = start_server(env)
    assert pipeline(wait_for(fresh, "the backlog", lambda s: pipeline(s)[2] == 1))[:2] == (0, 0)
    file = Path(landing.location) / "ingested_mlp.json"
    newer = file.stat().st_mtime_ns + 10**9  # a new version, newer than the kernel
    os.utime(file, ns=(newer, newer))
    landing.put("second_mlp.json", blueprint_file("second_mlp", width=5))
    for serving in (server, fresh):  # the look that sees the new file saw the touched one too
        wait_for(serving, "only the new file pending", lambda s: pipeline(s)[0] == 1)


@pytest.mark.slow
def test_metrics_answer_while_the_repository_does_not(tmp_path: Path, pg_url, start_server):
    """The audit trail gone from under a running server (its table renamed): /metrics
    still answers 200 with the cache's metrics, the repository's source down and its
    failed looks counted, logged once, no password anywhere; renamed back, it recovers."""
    secret = "pw-" + uuid.uuid4().hex
    url = pg_url.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@", 1)
    assert secret in url  # trust authentication ignores the password; it must not leak
    env = server_env(tmp_path / "home", ESPER_DATABASE_URL=url)
    server = start_server(env)
    wait_for(
        server,
        "the repository up",
        lambda s: value(s, "esper_metrics_source_up", source="repository"),
    )
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE asset_events RENAME TO asset_events_away")
        down = wait_for(server, "the repository down", lambda s: value(
            s, "esper_metrics_collect_errors_total", source="repository") >= 1)  # fmt: skip
        conn.execute("ALTER TABLE asset_events_away RENAME TO asset_events")
    assert value(down, "esper_metrics_source_up", source="repository") == 0
    assert not operations(down)
    assert ("esper_cache_tier_hits_total", (("tier", "l1"),)) in down
    assert value(down, "esper_metrics_source_up", source="landing") == 0  # no blueprints/ here
    for _ in range(3):
        response = httpx.get(server.url + "/metrics", timeout=TIMEOUT)
        assert response.status_code == 200 and secret not in response.text
    wait_until(
        lambda: value(scrape(server), "esper_metrics_source_up", source="repository") == 1,
        "the repository up again", 30.0,
    )  # fmt: skip
    log = server.output()
    assert secret not in log and "Traceback" not in log
    assert log.count("cannot read the repository's records") == 1, log


def age_events(repo, seconds: float) -> None:
    """Move every audit event ``seconds`` into the past (the backend seam for tools)."""
    db = repo.backend
    with db.transaction() as conn:
        rows = db.fetchall(conn, "SELECT event_id, at FROM asset_events")
        for event_id, at in rows:
            older = db.decode_time(at) - timedelta(seconds=seconds)
            db.execute(conn, "UPDATE asset_events SET at = %s WHERE event_id = %s",
                       (db.encode_time(older), event_id))  # fmt: skip


def test_operation_totals_count_each_event_once_as_events_settle(backend_env):
    """The running totals behind esper_repository_operations_total: events counted while
    recent, then once settled (read no more), then new ones on top; never twice."""
    with wiring.open_repository(Settings.from_env(backend_env)) as repo:
        totals = OperationTotals()

        def create(name: str) -> str:
            meta = AssetMetadata(asset_type="blueprint", name=name, version="1.0.0")
            return repo.create_asset(meta, name.encode())

        first = create("settling-a")
        assert totals.totals(repo)["created"] == 1  # recent: counted, read again next time
        age_events(repo, SETTLE_S + 60)
        repo.update_asset(first, {"tags": {"x"}})  # recent
        assert totals.totals(repo) == totals.totals(repo)  # the settled one not counted twice
        assert (totals.totals(repo)["created"], totals.totals(repo)["updated"]) == (1, 1)
        age_events(repo, SETTLE_S + 60)
        create("settling-b")
        counted = totals.totals(repo)
        assert (counted["created"], counted["updated"], counted["deprecated"]) == (2, 1, 0)
        assert repo.count_events(0).through == repo.count_events(0).through > 0
