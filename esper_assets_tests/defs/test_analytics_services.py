"""The analytics domain on the services: ESPER_* point at PostgreSQL (repository and L3,
a schema of the test's own), Redis (L2) and S3 (moto's HTTP server, a bucket of the
test's own), and the project's own jobs run on an ephemeral Dagster instance.

- ``analytics_daily`` materializes a day: every check passes, the rollups land in the
  bucket, a corrupt usage file there is skipped and named.
- Retirement with ``apply: True`` deprecates an idle kernel and its blueprint in
  PostgreSQL, the reason in their audit trails, and spares a used kernel and one a
  live checkpoint names.
- The warm job (and its flow, ``upkeep.warm_most_used``) loads the warm list's top
  kernels into Redis, in rank order.
- ``esper analytics query`` reads events, assets and kernel_usage_daily from S3 and
  PostgreSQL; a malformed query exits 1 with one line.

ESPER_* name no Redis key prefix, so the Dagster warm job's cache writes under the
default ``esper:kc:`` in a Redis database of this module's own (the kernel ids are
unique per test); caches built here take the ``redis_prefix`` of the test.
"""

from __future__ import annotations

import io
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import dagster as dg
import psycopg
import pyarrow.parquet as pq
import pytest
import redis
from click.testing import CliRunner

from esper_assets.analytics import rollups
from esper_assets.cli import main
from esper_assets.defs import build_definitions
from esper_assets.flows import upkeep, wiring
from esper_assets.settings import Settings
from esper_assets.storage import AssetMetadata
from esper_assets.storage.objects import ObjectStore, make_s3_client
from esper_assets_tests.analytics.test_rollups import a_day_of_use, register, row, write_file
from esper_assets_tests.defs.test_analytics_defs import NAMES, checks, materialized

DAY = date(2026, 11, 5)
# The Redis database the Dagster warm job's cache uses (its key prefix is fixed).
REDIS_DB = 14
L2_PREFIX = "esper:kc:"


@dataclass
class Services:
    settings: Settings
    store: ObjectStore  # the store the code location reads and writes (bucket/esper/...)
    bucket: str
    endpoint: str
    pg_url: str
    redis_url: str

    def bucket_keys(self, prefix: str) -> list[str]:
        listing = make_s3_client(self.endpoint).list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return sorted(o["Key"] for o in listing.get("Contents", []))

    def bucket_parquet(self, key: str) -> list[dict]:
        """A file read straight from the bucket with boto3, not through esper."""
        body = make_s3_client(self.endpoint).get_object(Bucket=self.bucket, Key=key)["Body"]
        return pq.read_table(io.BytesIO(body.read())).to_pylist()


@pytest.fixture
def services(
    monkeypatch, tmp_path, pg_url, redis_server_url, redis_prefix, s3_endpoint, s3_bucket
) -> Services:
    """ESPER_* on this test's schema, a Redis database of the module's own and this
    test's bucket (objects under ESPER_S3_PREFIX's default, ``esper``)."""
    redis_url = urlunsplit(urlsplit(redis_server_url)._replace(path=f"/{REDIS_DB}"))
    monkeypatch.setenv("ESPER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ESPER_DATABASE_URL", pg_url)
    monkeypatch.setenv("ESPER_REDIS_URL", redis_url)
    monkeypatch.setenv("ESPER_S3_BUCKET", s3_bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("ESPER_LANDING", f"s3://{s3_bucket}/landing")
    for name in ("ESPER_S3_PREFIX", "DAGSTER_HOME", "ESPER_USAGE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    assert settings.describe()["object_store"] == f"s3://{s3_bucket}/esper"
    store = wiring.object_store(settings)
    return Services(settings, store, s3_bucket, s3_endpoint, pg_url, redis_url)


def run_analytics_day(day: date, run_config: dict | None = None) -> dg.ExecuteInProcessResult:
    job = build_definitions(Settings.from_env()).resolve_job_def("analytics_daily")
    return job.execute_in_process(
        partition_key=day.isoformat(), run_config=run_config or {},
        instance=dg.DagsterInstance.ephemeral(),
    )  # fmt: skip


def kernel(asset_id: str, name: str) -> AssetMetadata:
    """A kernel registered under its kernel id, as the pipeline registers them."""
    return AssetMetadata(asset_type="kernel", name=name, asset_id=asset_id)


# -- 1: a day materialized on the services ---------------------------------------------------
@pytest.mark.slow  # a Dagster run on the services: 3-4 s
def test_a_day_materializes_on_the_services_with_rollups_in_the_bucket(services):
    a_day_of_use(services.store)  # k-a: 10 reads, k-b: 100 (l2), bp-1: repository reads
    corrupt = "usage/events/date=2026-11-05/hour=04/h9-1-000000.parquet"
    services.store.put(corrupt, b"PAR1 but not really")
    with wiring.open_repository(services.settings) as repo:
        register(repo, "blueprint", "bp-1")
        register(repo, "kernel", "k-b", ["bp-1"])

    result = run_analytics_day(DAY)

    assert result.success
    assert len(checks(result)) == 12 and all(checks(result).values()), checks(result)
    meta = materialized(result)
    events = meta["usage_events_daily"]
    assert (events["dagster/row_count"], events["files"], events["skipped_files"]) == (7, 2, 1)
    assert corrupt in events["skipped"]
    usage = meta["kernel_usage_daily"]
    assert (usage["requests"], usage["kernels"], usage["hit_rate_l2"]) == (110, 2, 100 / 110)
    assert "| 1 | k-b |" in meta["cache_warm_list"]["top_kernels"]
    assert meta["retirement_candidates"]["dagster/row_count"] == 0  # k-b and bp-1 are new
    assert meta["asset_inventory"]["assets"] == 2  # the two rows in PostgreSQL
    # Every rollup is one file of the day in the bucket, under ESPER_S3_PREFIX.
    names = ["events", "inventory", "kernel_usage", "retirement_candidates", "warm_list"]
    assert services.bucket_keys("esper/usage/daily/") == [
        f"esper/{rollups.daily_key(name, DAY)}" for name in names
    ]
    assert {n: str(m["path"]) for n, m in meta.items()} == {
        n: rollups.daily_key(name, DAY)
        for n, name in zip(NAMES, ["events", "kernel_usage", "warm_list",
                                   "retirement_candidates", "inventory"], strict=True)
    }  # fmt: skip
    read = services.bucket_parquet(f"esper/{rollups.daily_key('kernel_usage', DAY)}")
    assert {(r["kernel_id"], r["tier"]): r["requests"] for r in read} == {
        ("k-a", "l1"): 6, ("k-a", "l3"): 3, ("k-a", "miss"): 1, ("k-b", "l2"): 100,
    }  # fmt: skip
    inventory = services.bucket_parquet(f"esper/{rollups.daily_key('inventory', DAY)}")
    assert sorted((r["asset_type"], r["state"], r["assets"]) for r in inventory) == [
        ("blueprint", "active", 1), ("kernel", "active", 1),
    ]  # fmt: skip
    # The corrupt file is skipped, not removed.
    assert services.store.get(corrupt) == b"PAR1 but not really"


# -- 2: retirement applied to the PostgreSQL repository --------------------------------------
RETIRE_DAY = date(2026, 11, 20)
UNUSED_DAYS = 10  # the window: 2026-11-11 .. 2026-11-20
REGISTERED = datetime(2026, 9, 1, tzinfo=UTC)  # long before the window


@pytest.mark.slow  # a Dagster run on the services: 3-4 s
def test_retirement_applied_through_dagster_deprecates_idle_assets_in_postgres(services):
    with wiring.open_repository(services.settings) as repo:
        for name in ("used", "idle", "saved"):
            register(repo, "blueprint", f"bp-{name}")
            register(repo, "kernel", f"k-{name}", [f"bp-{name}"])
        register(repo, "checkpoint", "run-1-step-1", ["k-saved"], kernels=["k-saved"])
    with psycopg.connect(services.pg_url, autocommit=True) as conn:  # registered in September
        assert conn.execute("UPDATE assets SET created_at = %s", (REGISTERED,)).rowcount == 7
    write_file(services.store, RETIRE_DAY - timedelta(days=2), 0, [row("k-used", "l2", 3)])
    # k-idle was read the day before the window: that does not keep it.
    write_file(
        services.store, RETIRE_DAY - timedelta(days=UNUSED_DAYS), 0, [row("k-idle", "l1", 9)]
    )

    config = {"unused_days": UNUSED_DAYS, "apply": True}
    result = run_analytics_day(RETIRE_DAY, {"ops": {"retirement_candidates": {"config": config}}})

    assert result.success
    assert all(checks(result).values()), checks(result)
    retired = materialized(result)["retirement_candidates"]
    assert (retired["kernels"], retired["blueprints"], retired["deprecated"]) == (1, 1, True)
    listed = services.bucket_parquet(
        f"esper/{rollups.daily_key('retirement_candidates', RETIRE_DAY)}"
    )
    assert [(r["asset_id"], r["deprecated"]) for r in listed] == [
        ("k-idle", True), ("bp-idle", True),
    ]  # fmt: skip
    reason = f"no use in the {UNUSED_DAYS} days to {RETIRE_DAY:%Y-%m-%d}"
    with wiring.open_repository(services.settings) as repo:  # a new connection to PostgreSQL
        assert repo.dialect == "postgres"
        state = {a: repo.get_metadata(a).state for a in
                 ("k-idle", "bp-idle", "k-used", "bp-used", "k-saved", "bp-saved")}  # fmt: skip
        assert state == {"k-idle": "deprecated", "bp-idle": "deprecated", "k-used": "active",
                         "bp-used": "active", "k-saved": "active", "bp-saved": "active"}  # fmt: skip
        for asset_id in ("k-idle", "bp-idle"):
            last = repo.get_audit_log(asset_id)[-1]
            assert (last["event"], last["actor"]) == ("deprecated", rollups.ACTOR)
            assert reason in last["details"]["reason"], last
        assert all(e["event"] != "deprecated" for e in repo.get_audit_log("k-saved"))


# -- 3: warming follows the warm list ------------------------------------------------------------
@pytest.mark.slow  # a Dagster run on the services: 3-4 s
def test_the_warm_job_loads_the_warm_lists_top_kernels_into_redis_in_rank_order(
    services, redis_server_url, redis_prefix
):
    tag = uuid.uuid4().hex[:8]
    hot, warm, cool, cold, blueprint = (f"{tag}-{n}" for n in ("hot", "warm", "cool", "cold", "bp"))
    write_file(services.store, DAY, 2, [
        row(cool, "l1", 5), row(cold, "l2", 1), row(hot, "l3", 50), row(warm, "miss", 20),
        row(cool, "l2", 4), row(blueprint, "repository", 500, source="repository", op="read"),
    ])  # fmt: skip
    values = {k: f"kernel bytes of {k}".encode() * 4 for k in (hot, warm, cool, cold)}
    with wiring.open_repository(services.settings) as repo:
        repo.create_asset(kernel(hot, "hot-kernel"), values[hot])  # in no cache tier
    # The others in L3 (PostgreSQL) only: this cache has no L2.
    with wiring.open_cache(services.settings, services.store, redis_url=None) as cache:
        for k in (warm, cool, cold):
            cache.put(k, values[k])

    assert run_analytics_day(DAY).success
    # Ranked by cache reads (misses count; repository reads of a blueprint do not).
    warm_list = services.bucket_parquet(f"esper/{rollups.daily_key('warm_list', DAY)}")
    ranked = [r["kernel_id"] for r in sorted(warm_list, key=lambda r: r["rank"])]
    assert ranked == [hot, warm, cool, cold]

    client = redis.Redis.from_url(services.redis_url)
    try:
        job = build_definitions(Settings.from_env()).resolve_job_def("warm_kernel_cache_job")
        run_config = {"ops": {"warm_most_used_kernels": {"config": {"count": 3}}}}
        result = job.execute_in_process(run_config=run_config,
                                        instance=dg.DagsterInstance.ephemeral())  # fmt: skip

        assert result.success
        (output,) = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
        warmed = {k: v.value for k, v in output.event_specific_data.metadata.items()}
        assert warmed == {"kernels": 3, "repository": 1, "l3": 2}
        in_l2 = {k: client.exists(L2_PREFIX + k) == 1 for k in (hot, warm, cool, cold)}
        assert in_l2 == {hot: True, warm: True, cool: True, cold: False}  # the top 3 only
    finally:
        client.delete(*(L2_PREFIX + k for k in values))
        client.close()

    # The flow the job calls, on a cache of this test's prefix: every kernel of the list,
    # in rank order, now all in L3 (the job put the hot one back from the repository).
    own_l2 = {"redis_url": redis_server_url, "redis_prefix": redis_prefix}
    with (
        wiring.open_cache(services.settings, services.store, **own_l2) as cache,
        wiring.open_repository(services.settings, services.store) as repo,
    ):
        report = upkeep.warm_most_used(cache, repo, 10, services.store)
        assert list(report.items()) == [(k, "l3") for k in ranked]
        assert [cache.get(k) for k in ranked] == [values[k] for k in ranked]
    client = redis.Redis.from_url(redis_server_url)
    try:
        assert all(client.exists(redis_prefix + k) for k in ranked)
    finally:
        client.close()


# -- 4: the query CLI on the services ---------------------------------------------------------
def esper_query(sql: str):
    return CliRunner().invoke(main, ["analytics", "query", sql, "--format", "json"])


def test_the_query_cli_reads_events_assets_and_rollups_from_s3_and_postgres(services):
    a_day_of_use(services.store)
    rollups.kernel_usage_daily(services.store, DAY)
    with wiring.open_repository(services.settings) as repo:
        repo.create_asset(kernel("k-a", "alpha"), b"alpha" * 8)
        repo.create_asset(kernel("k-b", "beta"), b"beta" * 8)

    events = esper_query(
        "SELECT id, source, sum(requests) AS requests FROM events WHERE op <> 'put'"
        " GROUP BY ALL ORDER BY id"
    )
    joined = esper_query(
        "SELECT a.name, a.asset_type, k.day, sum(k.requests) AS requests"
        " FROM kernel_usage_daily AS k JOIN assets AS a ON a.asset_id = k.kernel_id"
        " GROUP BY ALL ORDER BY a.name"
    )
    bad = esper_query("SELEC id FROM events")

    assert events.exit_code == 0, events.output
    assert json.loads(events.stdout) == [
        {"id": "bp-1", "source": "repository", "requests": 2},
        {"id": "k-a", "source": "cache", "requests": 10},
        {"id": "k-b", "source": "cache", "requests": 100},
    ]
    assert joined.exit_code == 0, joined.output
    assert json.loads(joined.stdout) == [
        {"name": "alpha", "asset_type": "kernel", "day": "2026-11-05", "requests": 10},
        {"name": "beta", "asset_type": "kernel", "day": "2026-11-05", "requests": 100},
    ]
    assert bad.exit_code == 1
    assert bad.stderr.strip().splitlines() == [
        'error: malformed query: Parser Error: syntax error at or near "SELEC"'
    ]
    assert "Traceback" not in bad.output
