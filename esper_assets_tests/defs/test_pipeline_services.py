"""The Dagster pipeline end to end on the services: a Dagster instance built from the
repository's own production ``deploy/dagster.yaml`` (run, event-log and schedule storage in a
fresh PostgreSQL database, queued runs), the asset repository and L3 in PostgreSQL
(a schema of this module's own), L2 in Redis, L4 and the landing zone in S3 (moto's
HTTP server).

The twelve examples are landed and run once for the module (``services_run``) with a
password in ESPER_DATABASE_URL; the tests then look at that one run from several
sides. Bad input gets its own, smaller run.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import dagster as dg
import pytest

from esper_assets.blueprints import kernel_id_for, parse_blueprint
from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.defs import build_definitions
from esper_assets.flows import kernels as kernel_flows
from esper_assets.flows import wiring
from esper_assets.flows.landing import S3Landing
from esper_assets.runner import (
    TickReport,
    dagster_lineage,
    land_examples,
    tick_and_run,
)
from esper_assets.settings import Settings
from esper_assets.storage import AssetRepository, PersistentKernelCache
from esper_assets.storage.objects import make_s3_client
from esper_assets_tests.conftest import with_search_path

# slow: the module fixture runs the whole pipeline on the services (~40 s)
pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.s3, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
PRODUCTION_DAGSTER_YAML = REPO_ROOT / "deploy" / "dagster.yaml"
CHECKS = {"blueprint_is_valid": True, "kernel_round_trip": True}
# Used when the test server's URL carries no password (trust auth accepts any).
INJECTED_SECRET = "s3cret-pw-123"
# Kernel + blueprint versions, for every example (kernel name -> blueprint names).
EXAMPLE_CHAINS = {
    "mlp_base": ["mlp_base"],
    "residual_mlp": ["residual_mlp", "mlp_base"],
    "residual_mlp_ln": ["residual_mlp_ln", "residual_mlp", "mlp_base"],
    "residual_mlp_ln_wide": ["residual_mlp_ln_wide", "residual_mlp_ln", "residual_mlp", "mlp_base"],
    "policy_head": ["policy_head", "mlp_base"],
    "value_head": ["value_head", "policy_head", "mlp_base"],
    "conv_stem": ["conv_stem"],
    "conv_block": ["conv_block", "conv_stem"],
    "conv_classifier": ["conv_classifier", "conv_block", "conv_stem"],
    "gated_unit": ["gated_unit"],
    "tiny_autoencoder": ["tiny_autoencoder"],
    "token_mixer": ["token_mixer"],
}
# The cache's Redis key prefix is not configurable through ESPER_*, so this module's
# kernels go to a Redis database of their own instead of a prefix of their own.
REDIS_DB = 12
REDIS_PREFIX = "esper:kc:"


def stem(path: Path) -> str:
    return path.name.split(".")[0]


def example_kernel_ids() -> dict[str, str]:
    return {
        stem(p): kernel_id_for(
            parse_blueprint(p.read_bytes(), source=p.name, expected_name=stem(p))
        )
        for p in example_blueprint_files()
    }


# -- building blocks ---------------------------------------------------------------------
def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = quote(unquote(parts.username or "postgres"), safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


def redis_db_url(server_url: str, db: int) -> str:
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{db}"))


class Services:
    """Creates what one pipeline run needs on the shared servers, and removes it again."""

    def __init__(self, pg_server_url: str) -> None:
        import psycopg

        self.psycopg = psycopg
        self.server = pg_server_url
        self.dagster_db = f"esper_dagster_{uuid.uuid4().hex[:12]}"
        self.schema = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.dagster_db}")
            conn.execute(f"CREATE SCHEMA {self.schema}")

    def dagster_db_url(self) -> str:
        return urlunsplit(urlsplit(self.server)._replace(path=f"/{self.dagster_db}", query=""))

    def close(self) -> None:
        with self.psycopg.connect(self.server, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.dagster_db} WITH (FORCE)")
            conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")


def set_dagster_pg_env(mp: pytest.MonkeyPatch, server_url: str, db: str) -> None:
    parts = urlsplit(server_url)
    mp.setenv("DAGSTER_PG_HOST", parts.hostname or "127.0.0.1")
    mp.setenv("DAGSTER_PG_PORT", str(parts.port or 5432))
    mp.setenv("DAGSTER_PG_DB", db)
    mp.setenv("DAGSTER_PG_USER", unquote(parts.username or "postgres"))
    mp.setenv("DAGSTER_PG_PASSWORD", unquote(parts.password or ""))
    mp.delenv("DAGSTER_HOME", raising=False)


def production_instance(home: Path) -> dg.DagsterInstance:
    """An instance from a copy of deploy/dagster.yaml (Dagster writes local
    artifacts next to its config, so the file is copied rather than loaded in place)."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(PRODUCTION_DAGSTER_YAML, home / "dagster.yaml")
    return dg.DagsterInstance.from_config(str(home))


def set_esper_env(
    mp: pytest.MonkeyPatch, home: Path, database_url: str, redis_url: str, bucket: str,
    endpoint: str,
) -> str:  # fmt: skip
    landing = f"s3://{bucket}/landing"
    mp.setenv("ESPER_HOME", str(home))
    mp.setenv("ESPER_DATABASE_URL", database_url)
    mp.setenv("ESPER_REDIS_URL", redis_url)
    mp.setenv("ESPER_S3_BUCKET", bucket)
    mp.delenv("ESPER_S3_PREFIX", raising=False)
    mp.setenv("AWS_ENDPOINT_URL", endpoint)
    mp.setenv("ESPER_LANDING", landing)
    return landing


def new_bucket(endpoint: str) -> str:
    bucket = f"esper-test-{uuid.uuid4().hex[:12]}"
    make_s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


def check_evaluations(instance: dg.DagsterInstance, run_id: str) -> dict:
    """Each check's evaluation for the run as a whole (the one without a partition)."""
    records = instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluations = [record.dagster_event.event_specific_data for record in records]
    return {e.check_name: e for e in evaluations if e.partition is None}


def materializations(instance: dg.DagsterInstance, asset: str, partition: str) -> list[dict]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=100,
    ).records
    return [
        {k: v.value for k, v in r.asset_materialization.metadata.items()}
        for r in records
        if r.asset_materialization is not None
    ]


# -- the module's instance and its one full run ---------------------------------------------
@dataclass
class Production:
    """The module's services, environment and instance from deploy/dagster.yaml."""

    instance: dg.DagsterInstance
    services: Services
    secret: str
    database_url: str
    redis_url: str
    bucket: str
    landing: str
    home: Path


@dataclass
class ServicesRun(Production):
    defs: dg.Definitions
    report: TickReport
    redis_absent_before: dict[str, bool]


@pytest.fixture(scope="module")
def production(
    pg_server_url: str, redis_server_url: str, s3_endpoint: str, tmp_path_factory
) -> Iterator[Production]:
    import redis

    tmp = tmp_path_factory.mktemp("services")
    services = Services(pg_server_url)
    secret = unquote(urlsplit(pg_server_url).password or "") or INJECTED_SECRET
    database_url = with_search_path(with_password(pg_server_url, secret), services.schema)
    redis_url = redis_db_url(redis_server_url, REDIS_DB)
    bucket = new_bucket(s3_endpoint)
    instance = None
    try:
        # The patched environment stays in place for the module's tests (until teardown).
        with pytest.MonkeyPatch.context() as mp:
            landing = set_esper_env(mp, tmp / "esper", database_url, redis_url, bucket, s3_endpoint)
            set_dagster_pg_env(mp, pg_server_url, services.dagster_db)
            instance = production_instance(tmp / "dagster_home")
            yield Production(
                instance, services, secret, database_url, redis_url, bucket, landing, tmp
            )
    finally:
        if instance is not None:
            instance.dispose()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=REDIS_PREFIX + "*", count=1000):
            client.delete(key)
        client.close()
        services.close()


@pytest.fixture(scope="module")
def services_run(production: Production) -> ServicesRun:
    """The twelve examples landed in S3 and run through the sensor, once for the module."""
    import redis

    client = redis.Redis.from_url(production.redis_url)
    kernel_keys = [REDIS_PREFIX + k for k in example_kernel_ids().values()]
    client.delete(*kernel_keys)  # left by an earlier session: "present" must mean "put now"
    absent = {key: not client.exists(key) for key in kernel_keys}
    client.close()
    landed = land_examples(wiring.landing_zone(Settings.from_env()))
    assert len(landed) == 12
    defs = build_definitions()
    report = tick_and_run(defs, production.instance)
    return ServicesRun(**vars(production), defs=defs, report=report, redis_absent_before=absent)


# -- tests ----------------------------------------------------------------------------------
def test_the_instance_is_deploy_dagster_yaml_on_postgres(production: Production):
    from dagster_postgres import (
        PostgresEventLogStorage,
        PostgresRunStorage,
        PostgresScheduleStorage,
    )

    instance = production.instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.schedule_storage, PostgresScheduleStorage)
    assert isinstance(instance.run_coordinator, dg.QueuedRunCoordinator)
    assert (
        production.home / "dagster_home" / "dagster.yaml"
    ).read_bytes() == PRODUCTION_DAGSTER_YAML.read_bytes()
    assert instance.root_directory == str(production.home / "dagster_home")
    # Dagster created its tables in this module's own database.
    import psycopg

    with psycopg.connect(production.services.dagster_db_url()) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            ).fetchall()
        }
    assert {"runs", "event_logs", "jobs", "asset_keys"} <= tables, tables


def test_the_production_instance_stores_events(production: Production):
    """The smallest write every run makes: one event into the PostgreSQL event log."""
    instance = production.instance
    instance.report_runless_asset_event(dg.AssetMaterialization("esper_storage_probe"))
    records = instance.fetch_materializations(dg.AssetKey("esper_storage_probe"), limit=1).records
    assert len(records) == 1


def test_the_runs_are_in_the_production_database(services_run: ServicesRun):
    import psycopg

    with psycopg.connect(services_run.services.dagster_db_url()) as conn:
        run_ids = {r[0] for r in conn.execute("SELECT run_id FROM runs").fetchall()}
        (events,) = conn.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = ANY(%s)", (list(run_ids),)
        ).fetchone()
    assert run_ids == {r.run_id for r in services_run.report.runs}
    assert len(run_ids) == 12 and events > 12


def test_every_example_is_registered_compiled_and_cached_on_the_services(services_run: ServicesRun):
    report, instance = services_run.report, services_run.instance
    assert sorted(r.partitions[0] for r in report.runs) == sorted(EXAMPLE_CHAINS)
    for run in report.runs:
        assert run.success and run.checks == CHECKS and not run.error, run
    expected_ids = example_kernel_ids()

    with AssetRepository.from_env() as repo:
        assert repo.dialect == "postgres"
        kernels = {m.name: m.asset_id for m in kernel_flows.registered_kernels(repo)}
        blueprints = {m.name for m in kernel_flows.registered_blueprints(repo)}
    assert kernels == expected_ids  # registered under their kernel ids
    assert blueprints == set(EXAMPLE_CHAINS)

    import psycopg

    with psycopg.connect(services_run.database_url) as conn:
        rows = conn.execute(
            "SELECT asset_type, count(*) FROM assets GROUP BY asset_type ORDER BY 1"
        ).fetchall()
        (schema,) = conn.execute("SELECT current_schema()").fetchone()
        cached = {r[0] for r in conn.execute("SELECT id FROM kernel_cache").fetchall()}
    assert schema == services_run.services.schema
    assert rows == [("blueprint", 12), ("kernel", 12)]
    assert cached == set(expected_ids.values())  # L3 in PostgreSQL

    import redis

    client = redis.Redis.from_url(services_run.redis_url)
    try:
        assert all(services_run.redis_absent_before.values())
        in_redis = {
            name: bool(client.exists(REDIS_PREFIX + kid)) for name, kid in expected_ids.items()
        }
    finally:
        client.close()
    assert all(in_redis.values()), in_redis  # L2: put by this run (absent before it)

    landed = {stem(p): p.name for p in example_blueprint_files()}
    for name, kernel_id in expected_ids.items():
        meta = materializations(instance, "compiled_kernels", name)[0]
        assert meta["kernel_id"] == kernel_id and "repository_id" not in meta  # one id
        assert {"l1", "l2", "l3"} <= set(meta["tiers_written"].split(", ")), (name, meta)
        blueprint = materializations(instance, "blueprints", name)[0]
        assert blueprint["file"] == f"blueprints/{landed[name]}"  # relative to s3://.../

    with PersistentKernelCache.from_env() as cache:  # a fresh process's view: L1 is empty
        for name, kernel_id in expected_ids.items():
            assert cache.get(kernel_id) is not None, name
        stats = cache.get_stats()
    assert stats["tiers"]["l2"]["hits"] == 12  # served by Redis, not L3
    assert stats["tiers"]["l3"]["hits"] == 0


def test_lineage_agrees_between_repository_and_dagster_event_log(services_run: ServicesRun):
    with AssetRepository.from_env() as repo:
        for name, blueprints in EXAMPLE_CHAINS.items():
            chain = kernel_flows.lineage_chain(repo, name)
            from_dagster = dagster_lineage(services_run.instance, name)
            assert [m.asset_id for m in chain] == [s["repository_id"] for s in from_dagster], name
            assert [(m.asset_type, m.name) for m in chain] == [
                ("kernel", name),
                *(("blueprint", b) for b in blueprints),
            ]
            assert [s["partition"] for s in from_dagster[1:]] == blueprints
    assert len(EXAMPLE_CHAINS["residual_mlp_ln_wide"]) + 1 == 5


def test_the_database_password_is_nowhere_in_what_dagster_stored(services_run: ServicesRun):
    secret, instance, defs = services_run.secret, services_run.instance, services_run.defs
    assert secret in services_run.database_url  # the run really had a password to leak
    # The resources name the variable; its value is resolved inside the run only.
    assert defs.resources["database"].url == dg.EnvVar("ESPER_DATABASE_URL")
    assert defs.resources["kernel_cache"].redis.data["url"] == dg.EnvVar("ESPER_REDIS_URL")
    assert secret not in repr(defs.resources)

    places: dict[str, str] = {}
    for outcome in services_run.report.runs:
        run = instance.get_run_by_id(outcome.run_id)
        assert run is not None
        places[f"run {run.run_id}"] = dg.serialize_value(run)  # run config, tags, origin
        places[f"run config {run.run_id}"] = repr(run.run_config)
        places[f"tags {run.run_id}"] = repr(run.tags)
        places[f"job snapshot {run.run_id}"] = dg.serialize_value(
            instance.get_job_snapshot(run.job_snapshot_id)
        )
        places[f"plan snapshot {run.run_id}"] = dg.serialize_value(
            instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
        )
        logs = instance.all_logs(run.run_id)
        assert logs, run.run_id
        for i, entry in enumerate(logs):
            places[f"event {run.run_id}#{i}"] = dg.serialize_value(entry)
    for asset in ("blueprints", "compiled_kernels"):
        for name in EXAMPLE_CHAINS:
            places[f"{asset}[{name}] metadata"] = repr(materializations(instance, asset, name))
    leaks = [where for where, text in places.items() if secret in text]
    assert not leaks, leaks[:5]

    # And the raw rows of every table in Dagster's database, whatever Dagster keeps there.
    import psycopg
    from psycopg import sql

    with psycopg.connect(services_run.services.dagster_db_url()) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            ).fetchall()
        ]
        assert "event_logs" in tables and "runs" in tables

        def rows_holding(table: str, text: str) -> int:
            query = sql.SQL("SELECT count(*) FROM {} t WHERE strpos(t::text, %s) > 0")
            return conn.execute(query.format(sql.Identifier(table)), (text,)).fetchone()[0]

        # The scan does find what is there (a run id in the runs table) ...
        assert rows_holding("runs", services_run.report.runs[0].run_id) == 1
        # ... and finds no password anywhere.
        leaking_tables = [table for table in tables if rows_holding(table, secret)]
    assert not leaking_tables, leaking_tables

    # And the files the instance wrote under its home (cursor, compute logs, ...).
    leaking_files = [
        str(p)
        for p in (services_run.home / "dagster_home").rglob("*")
        if p.is_file() and secret.encode() in p.read_bytes()
    ]
    assert not leaking_files, leaking_files


MALFORMED_YAML = b"name: broken_head\nversion: 1.0.0\nlayers: [ {op: linear, out_features: 4\n"


def test_bad_input_on_the_services_fails_its_own_partition_and_stays_landed(
    pg_server_url, pg_url, redis_server_url, s3_endpoint, tmp_path, monkeypatch
):
    import redis

    services = Services(pg_server_url)
    redis_url = redis_db_url(redis_server_url, REDIS_DB + 1)  # not the module run's
    instance = None
    try:
        bucket = new_bucket(s3_endpoint)
        location = set_esper_env(
            monkeypatch, tmp_path / "esper", pg_url, redis_url, bucket, s3_endpoint
        )
        set_dagster_pg_env(monkeypatch, pg_server_url, services.dagster_db)
        instance = production_instance(tmp_path / "dagster_home")
        landing = wiring.landing_zone(Settings.from_env())
        assert landing.location.startswith(location)
        assert isinstance(landing, S3Landing)
        examples = {p.name: p.read_bytes() for p in example_blueprint_files()}
        files = {
            "mlp_base.json": examples["mlp_base.json"],  # good
            "conv_block.yaml": examples["conv_block.yaml"],  # its parent conv_stem never landed
            "broken_head.yaml": MALFORMED_YAML,  # does not parse
        }
        for key, data in files.items():
            landing.put(key, data)

        report = tick_and_run(build_definitions(), instance)

        by_partition = {r.partitions[0]: r for r in report.runs}
        assert set(by_partition) == {"mlp_base", "conv_block", "broken_head"}
        good = by_partition["mlp_base"]
        assert good.success and good.checks == CHECKS, good
        problems = {
            "conv_block": ("conv_block.yaml", "conv_stem@1.0.0 is not registered"),
            "broken_head": ("broken_head.yaml", "invalid YAML at line 4"),
        }
        for name, (key, problem) in problems.items():
            bad = by_partition[name]
            assert not bad.success and bad.checks.get("blueprint_is_valid") is False, bad
            description = check_evaluations(instance, bad.run_id)["blueprint_is_valid"].description
            assert description.startswith(f"blueprints/{key}: "), description  # relative
            assert problem in description, description
            assert not materializations(instance, "compiled_kernels", name)  # blocked
            assert not materializations(instance, "blueprints", name)  # not materialized

        # Nothing deleted or moved aside: every file is where it landed, unchanged.
        assert {f.key for f in landing.list_blueprints()} == set(files)
        assert {key: landing.read(key) for key in files} == files
        listing = make_s3_client(s3_endpoint).list_objects_v2(
            Bucket=bucket, Prefix=f"{landing.folder}rejected/"
        )
        assert listing.get("KeyCount", 0) == 0
        with AssetRepository.from_env() as repo:
            assert [m.name for m in kernel_flows.registered_blueprints(repo)] == ["mlp_base"]
    finally:
        if instance is not None:
            instance.dispose()
        services.close()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=REDIS_PREFIX + "*", count=1000):
            client.delete(key)
        client.close()
