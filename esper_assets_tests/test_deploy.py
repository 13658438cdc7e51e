"""The deployment folder ``deploy/``: what can be checked without a cluster.

- every file is YAML and holds no secret: each value under a key naming a secret is
  ``{env: NAME}``, no string carries credentials, no ``NAME=value`` sets a secret
  variable (and the checker itself flags each of those);
- ``deploy/cluster/dagster.yaml`` passes Dagster's own instance schema as it is, with
  its K8sRunLauncher (dagster-k8s is not installed: its config is checked against the
  fields dagster-k8s 0.29 takes), and Dagster refuses variants with a bad
  ``concurrency:`` section, so the check is not vacuous;
- the same file with Dagster's default launcher in place of Kubernetes's is a working
  instance here: PostgreSQL storage, the run queue limits and pools it declares, and a
  run's step logs uploaded to S3 (moto);
- ``deploy/workspace.yaml`` names the code location and its code server (the daemon
  test, ``defs/test_daemon.py``, loads it for real);
- with ``ESPER_REQUIRE_SERVICES=1`` and no service variables, a run of
  ``ingest_blueprints`` refuses to start, naming every missing variable, and writes
  nothing locally.
"""

from __future__ import annotations

import re
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import dagster as dg
import pytest
import yaml

from esper_assets.defs import _compat, blueprint_partitions, build_definitions
from esper_assets.errors import ConfigError
from esper_assets.settings import SERVICE_VARIABLES
from esper_assets.storage.objects import make_s3_client

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
CLUSTER_YAML = DEPLOY / "cluster" / "dagster.yaml"
YAML_FILES = sorted(DEPLOY.rglob("*.yaml"))


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# -- no secret in any file ------------------------------------------------------------------
SECRET_KEY = re.compile(r"(?i)password|secret|token|credential|access_key")
CREDENTIAL_URL = re.compile(r"://[^/\s@:]*:[^/\s@]*@")
SECRET_VARIABLES = ("ESPER_DATABASE_URL", "ESPER_REDIS_URL", "DAGSTER_PG_PASSWORD",
                    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")  # fmt: skip
SECRET_ASSIGNMENT = re.compile(rf"^\s*({'|'.join(SECRET_VARIABLES)})\s*=")


def from_env(value: object) -> bool:
    """``{env: NAME}``, or a list of them."""
    if isinstance(value, list):
        return bool(value) and all(from_env(item) for item in value)
    return isinstance(value, dict) and set(value) == {"env"} and isinstance(value["env"], str)


def literal_secrets(node: object, path: tuple[str, ...] = ()) -> list[str]:
    """Where ``node`` holds a secret itself instead of naming an environment variable."""
    found = []
    if isinstance(node, dict) and not from_env(node):
        for key, value in node.items():
            where = (*path, str(key))
            if SECRET_KEY.search(str(key)) and not from_env(value):
                found.append(".".join(where))
            found += literal_secrets(value, where)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += literal_secrets(item, (*path, str(i)))
    elif isinstance(node, str) and (CREDENTIAL_URL.search(node) or SECRET_ASSIGNMENT.match(node)):
        found.append(".".join(path))
    return found


def env_names(node: object) -> set[str]:
    if from_env(node) and isinstance(node, dict):
        return {node["env"]}
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    return set().union(*(env_names(child) for child in children))


def test_the_deploy_folder_holds_the_files_the_readme_names():
    assert [p.relative_to(DEPLOY).as_posix() for p in YAML_FILES] == [
        "cluster/dagster.yaml", "dagster.yaml", "workspace.yaml",
    ]  # fmt: skip


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_deploy_file_is_yaml_without_a_secret(path: Path):
    config = load(path)
    assert isinstance(config, dict) and config
    assert literal_secrets(config) == []
    # and every variable it reads is documented in deploy/README.md
    documented = (DEPLOY / "README.md").read_text()
    assert [name for name in sorted(env_names(config)) if f"`{name}" not in documented] == []


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"storage": {"postgres": {"postgres_db": {"password": "hunter2"}}}},
         "storage.postgres.postgres_db.password"),
        ({"run_launcher": {"config": {"postgres_password_secret": "pg-secret"}}},
         "run_launcher.config.postgres_password_secret"),
        ({"run_launcher": {"config": {"env_secrets": [{"env": "A"}, "esper"]}}},
         "run_launcher.config.env_secrets"),
        ({"compute_logs": {"config": {"endpoint_url": "http://key:pw@minio:9000"}}},
         "compute_logs.config.endpoint_url"),
        ({"run_launcher": {"config": {"env_vars": ["ESPER_DATABASE_URL=postgresql://h/db"]}}},
         "run_launcher.config.env_vars.0"),
    ],
)  # fmt: skip
def test_the_secret_check_flags_literals(config: dict, where: str):
    assert where in literal_secrets(config)


def test_both_instances_take_their_database_from_the_environment():
    single, cluster = load(DEPLOY / "dagster.yaml"), load(CLUSTER_YAML)
    assert cluster["storage"] == single["storage"]
    fields = single["storage"]["postgres"]["postgres_db"]
    assert {k: v for k, v in fields.items() if k not in ("scheme", "params")} == {
        "hostname": {"env": "DAGSTER_PG_HOST"}, "port": {"env": "DAGSTER_PG_PORT"},
        "db_name": {"env": "DAGSTER_PG_DB"}, "username": {"env": "DAGSTER_PG_USER"},
        "password": {"env": "DAGSTER_PG_PASSWORD"},
    }  # fmt: skip
    # no secret in the connection options either: only the commit setting
    assert fields["params"] == {"options": "-c synchronous_commit=off"}


def test_the_production_instance_commits_without_waiting_for_the_flush(pg_server_url):
    """deploy/dagster.yaml's connection option reaches the storages' sessions."""
    import sqlalchemy as sa

    from esper_assets.bench.pipeline import _production_instance, throwaway_database

    with throwaway_database(pg_server_url) as url, _production_instance(url) as instance:
        for storage in (instance.event_log_storage, instance.run_storage):
            with storage._engine.connect() as conn:  # noqa: SLF001
                assert conn.execute(sa.text("SHOW synchronous_commit")).scalar() == "off"


# -- the cluster instance against Dagster's schema ---------------------------------------------
def instance_ref(config: dict, home: Path):
    """The instance ``config`` describes, resolved by Dagster (its schema and its
    ``concurrency:`` rules) without opening it: nothing is imported or connected."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return _compat.dagster_private("InstanceRef").from_dir(str(home))


def classes(ref) -> dict[str, tuple[str, str]]:
    parts = ("run_launcher", "run_coordinator", "compute_logs")
    return {
        part: (data.module_name, data.class_name)
        for part in parts
        if (data := getattr(ref, f"{part}_data")) is not None
    }


def test_the_cluster_instance_passes_dagsters_schema(tmp_path: Path):
    config = load(CLUSTER_YAML)
    ref = instance_ref(config, tmp_path)
    assert classes(ref) == {
        "run_launcher": ("dagster_k8s.launcher", "K8sRunLauncher"),
        "run_coordinator": ("dagster._core.run_coordinator", "QueuedRunCoordinator"),
        "compute_logs": ("dagster_aws.s3.compute_log_manager", "S3ComputeLogManager"),
    }
    concurrency = ref.settings["concurrency"]
    assert concurrency["runs"]["max_concurrent_runs"] == 16
    assert concurrency["pools"] == {"granularity": "op", "default_limit": 4}
    # The pools are named where the file says which steps use them.
    text = CLUSTER_YAML.read_text()
    assert "esper_postgres:" in text and "esper_redis:" in text


def _bad_concurrency(config: dict, change: str) -> dict:
    config = yaml.safe_load(yaml.safe_dump(config))
    if change == "per-pool limits":  # not instance config in Dagster 1.13
        config["concurrency"]["pools"]["limits"] = {"esper_postgres": 8}
    elif change == "unknown granularity":
        config["concurrency"]["pools"]["granularity"] = "step"
    elif change == "run limit twice":
        config["run_coordinator"]["config"] = {"max_concurrent_runs": 4}
    elif change == "negative pool limit":
        config["concurrency"]["pools"]["default_limit"] = -1
    return config


@pytest.mark.parametrize(
    "change", ["per-pool limits", "unknown granularity", "run limit twice", "negative pool limit"]
)
def test_dagster_refuses_a_broken_concurrency_section(tmp_path: Path, change: str):
    with pytest.raises(dg.DagsterInvalidConfigError):
        instance_ref(_bad_concurrency(load(CLUSTER_YAML), change), tmp_path)


# K8sRunLauncher.config_type() of dagster-k8s 0.29 (DagsterK8sJobConfig.config_type_run_launcher
# in dagster_k8s/job.py): not installed here, so its field names are listed.
K8S_RUN_LAUNCHER_FIELDS = {
    "job_image", "image_pull_policy", "image_pull_secrets", "service_account_name",
    "env_config_maps", "env_secrets", "env_vars", "volume_mounts", "volumes", "labels",
    "resources", "scheduler_name", "security_context", "instance_config_map",
    "postgres_password_secret", "dagster_home", "load_incluster_config", "kubeconfig_file",
    "fail_pod_on_run_failure", "run_k8s_config", "job_namespace",
    "only_allow_user_defined_k8s_config_fields", "only_allow_user_defined_env_vars",
}  # fmt: skip


def test_the_k8s_launcher_is_configuration_only():
    launcher = load(CLUSTER_YAML)["run_launcher"]["config"]
    assert set(launcher) <= K8S_RUN_LAUNCHER_FIELDS
    assert "instance_config_map" in launcher  # the one required field
    # Each run pod refuses to start without the services.
    assert "ESPER_REQUIRE_SERVICES=1" in launcher["env_vars"]
    # Configuration only: the file says it needs dagster-k8s, which the project does
    # not depend on.
    assert "Needs the dagster-k8s package" in CLUSTER_YAML.read_text()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]
    assert not [r for r in requirements if r.startswith(("dagster-k8s", "dagster-celery"))]


# -- the cluster instance, runnable here with the default launcher --------------------------------
@pytest.fixture
def cluster_instance(
    pg_server_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[dg.DagsterInstance, str, str]]:
    """deploy/cluster/dagster.yaml with Dagster's default run launcher in place of
    Kubernetes's, on a fresh PostgreSQL database, its compute logs in a fresh bucket."""
    import psycopg

    database = f"esper_deploy_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
    bucket = f"esper-logs-{uuid.uuid4().hex[:12]}"
    make_s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    parts = urlsplit(pg_server_url)
    for name, value in {
        "DAGSTER_PG_HOST": parts.hostname or "127.0.0.1",
        "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_DB": database,
        "DAGSTER_PG_USER": unquote(parts.username or "postgres"),
        "DAGSTER_PG_PASSWORD": unquote(parts.password or ""),
        "DAGSTER_COMPUTE_LOGS_BUCKET": bucket,
        "DAGSTER_COMPUTE_LOGS_PREFIX": "dagster/compute-logs",
        "AWS_ENDPOINT_URL": s3_endpoint,  # boto3 reads it: the file names no endpoint
    }.items():
        monkeypatch.setenv(name, value)
    config = load(CLUSTER_YAML)
    del config["run_launcher"]
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    instance = None
    try:
        instance = dg.DagsterInstance.from_config(str(home))
        yield instance, bucket, s3_endpoint
    finally:
        if instance is not None:
            instance.dispose()
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


MARKER = "esper-step-output-7f3a"


@dg.op(pool="esper_postgres")
def uses_postgres() -> None:
    print(MARKER)


@dg.job
def pool_job() -> None:
    uses_postgres()


@pytest.mark.postgres
@pytest.mark.s3
def test_the_cluster_instance_works_here_with_the_default_launcher(cluster_instance):
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    instance, bucket, endpoint = cluster_instance
    assert isinstance(instance.run_storage, PostgresRunStorage)
    assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
    assert isinstance(instance.compute_log_manager, S3ComputeLogManager)
    queue = instance.get_concurrency_config().run_queue_config
    assert queue.max_concurrent_runs == 16
    assert {"key": "dagster/sensor_name", "value": "new_blueprints", "limit": 10} in (
        queue.tag_concurrency_limits
    )

    result = pool_job.execute_in_process(instance=instance)

    assert result.success
    # The step ran in the esper_postgres pool, which got the default limit (in PostgreSQL).
    pool = instance.event_log_storage.get_concurrency_info("esper_postgres")
    assert (pool.slot_count, pool.using_default_limit, pool.claimed_slots) == (4, True, [])
    # Its stdout is in the bucket, under the prefix, in the run's folder.
    s3 = make_s3_client(endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    stdout = [k for k in keys if k.endswith(".out")]
    assert stdout and all(
        k.startswith(f"dagster/compute-logs/storage/{result.run_id}/") for k in stdout
    )
    texts = [s3.get_object(Bucket=bucket, Key=k)["Body"].read().decode() for k in stdout]
    assert any(MARKER in text for text in texts)


# -- the workspace ------------------------------------------------------------------------------
def test_the_workspace_points_at_the_code_server():
    workspace = load(DEPLOY / "workspace.yaml")
    (entry,) = workspace["load_from"]
    server = entry["grpc_server"]
    assert server["host"] == {"env": "DAGSTER_CODE_LOCATION_HOST"}
    assert server["port"] == {"env": "DAGSTER_CODE_LOCATION_PORT"}
    # The location keeps the name of every other entry point (run keys and sensor
    # cursors are stored per location), and the code server serves the same module.
    dg_project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["dg"]["project"]
    assert server["location_name"] == dg_project["code_location_name"]
    local = load(REPO_ROOT / "workspace.yaml")["load_from"][0]["python_module"]
    assert local["location_name"] == server["location_name"]
    command = f"dagster code-server start -m {dg_project['defs_module']} "
    assert command in (DEPLOY / "workspace.yaml").read_text()


# -- ESPER_REQUIRE_SERVICES: a run refuses to start -------------------------------------------
def test_a_run_without_the_services_refuses_to_start_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    for name in SERVICE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("ESPER_HOME", raising=False)  # default: ./.esper
    monkeypatch.setenv("ESPER_REQUIRE_SERVICES", "1")
    workdir = tmp_path / "worker"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    # What a run worker does: load the code location, then execute the run.
    with dg.DagsterInstance.ephemeral() as instance, pytest.raises(ConfigError) as info:
        job = build_definitions().resolve_job_def("ingest_blueprints")
        instance.add_dynamic_partitions(blueprint_partitions.name, ["mlp_base"])
        job.execute_in_process(instance=instance, partition_key="mlp_base")

    message = str(info.value)
    for variable in ("ESPER_DATABASE_URL", "ESPER_S3_BUCKET", "ESPER_LANDING", "s3://"):
        assert variable in message
    assert "unset ESPER_REQUIRE_SERVICES" in message
    assert list(workdir.iterdir()) == []  # no .esper: no SQLite file, no directories
    assert [p.name for p in tmp_path.iterdir()] == ["worker"]
