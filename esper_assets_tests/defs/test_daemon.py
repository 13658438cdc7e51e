"""The deployment as a cluster runs it, on this machine: a real ``dagster-daemon run``
process and a real code server (``dagster code-server start -m esper_assets.defs``),
the daemon loading ``deploy/workspace.yaml`` (a ``grpc_server`` workspace) and the
instance of ``deploy/dagster.yaml`` (PostgreSQL storage in a fresh database, the
QueuedRunCoordinator, Dagster's default run launcher). esper itself is on PostgreSQL
(a schema of this test's own) and S3 (moto; the landing zone is ``s3://``), with
``ESPER_REQUIRE_SERVICES=1`` as on every machine of a cluster.

One blueprint file is landed; the daemon's tick of the ``new_blueprints`` sensor
(RUNNING by default) must request a run, the queued coordinator dequeue it, the
launcher start it in a run worker process of its own and the run succeed, with the
kernel registered in the repository, nothing written under ESPER_HOME and the database
password in no log, event or tag. Everything is polled against one deadline; the
processes (with the run workers they started) are killed whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import dagster as dg
import pytest

from esper_assets.blueprints import kernel_id_for, parse_blueprint
from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.defs import RUN_KEY_TAG, SENSOR_NAME_TAG
from esper_assets.flows import wiring
from esper_assets.flows.kernels import find_kernel
from esper_assets.settings import Settings
from esper_assets.storage.objects import make_s3_client
from esper_assets_tests.conftest import free_port, with_search_path
from esper_assets_tests.process_groups import default_signals, stop_group

# slow: two Dagster processes start, load the code location and run one blueprint (~25 s)
pytestmark = [pytest.mark.postgres, pytest.mark.s3, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEADLINE_S = 150  # from starting the processes to the run's end (a hang guard, no speed claim)
BLUEPRINT = "mlp_base"  # an example without a parent: one file, one run
# The tag Dagster's default run launcher puts on a run it started through a code server
# (dagster._core.storage.tags.GRPC_INFO_TAG; a string, as _compat keeps run tags).
GRPC_INFO_TAG = ".dagster/grpc_info"
TERMINAL = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}


@dataclass
class Cluster:
    env: dict[str, str]  # what every process of the "cluster" runs with
    dagster_home: Path
    logs: Path
    secret: str  # the database password in DAGSTER_PG_PASSWORD and ESPER_DATABASE_URL


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    user = quote(unquote(parts.username or "postgres"), safe="")
    netloc = f"{user}:{quote(password, safe='')}@{parts.hostname}:{parts.port or 5432}"
    return urlunsplit(parts._replace(netloc=netloc))


@pytest.fixture
def cluster(
    pg_server_url: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Cluster]:
    """A fresh Dagster database and esper schema, a bucket, DAGSTER_HOME holding a copy
    of deploy/dagster.yaml, and the environment the processes get (also set here, so
    this process opens the same instance)."""
    import psycopg

    database = f"esper_daemon_{uuid.uuid4().hex[:12]}"
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {database}")
        conn.execute(f"CREATE SCHEMA {schema}")
    bucket = f"esper-test-{uuid.uuid4().hex[:12]}"
    make_s3_client(s3_endpoint).create_bucket(Bucket=bucket)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    parts = urlsplit(pg_server_url)
    # The server's own password, else one it ignores (trust auth): either way, one that
    # must show up in no log, event or tag.
    secret = unquote(parts.password or "") or f"daemon-pw-{uuid.uuid4().hex[:8]}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ESPER_", "DAGSTER_", "AWS_")) and k != "VIRTUAL_ENV"
    }
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "VIRTUAL_ENV": sys.prefix,
        # Dagster: the instance and where the code server is
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": parts.hostname or "127.0.0.1",
        "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_DB": database,
        "DAGSTER_PG_USER": unquote(parts.username or "postgres"),
        "DAGSTER_PG_PASSWORD": secret,
        "DAGSTER_CODE_LOCATION_HOST": "127.0.0.1",
        "DAGSTER_CODE_LOCATION_PORT": str(free_port()),
        # esper: services only, local fallback refused
        "ESPER_REQUIRE_SERVICES": "1",
        "ESPER_HOME": str(tmp_path / "esper"),
        "ESPER_DATABASE_URL": with_search_path(with_password(pg_server_url, secret), schema),
        "ESPER_S3_BUCKET": bucket,
        "ESPER_LANDING": f"s3://{bucket}/landing",
        "AWS_ENDPOINT_URL": s3_endpoint,
    }
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        env[name] = os.environ[name]  # moto's, set by the s3_endpoint fixture
    for name, value in env.items():
        if name.startswith(("DAGSTER_", "ESPER_")):
            monkeypatch.setenv(name, value)
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        yield Cluster(env, home, logs, secret)
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@contextlib.contextmanager
def started(args: list[str], cluster: Cluster, name: str) -> Iterator[subprocess.Popen]:
    """``args`` as a process group of its own, its output in ``logs/<name>.log``; on
    exit SIGTERM to the whole group (its run workers too), then SIGKILL if need be."""
    with open(cluster.logs / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=cluster.logs,
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_signals,
        )
        try:
            yield process
        finally:
            stop_group(process, signal.SIGTERM, 15)


def tail(cluster: Cluster) -> str:
    return "\n".join(
        f"--- {path.name} (last 3000 characters):\n{path.read_text(errors='replace')[-3000:]}"
        for path in sorted(cluster.logs.glob("*.log"))
    )


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_for(condition, what: str, deadline: float, cluster: Cluster, *processes):
    """Poll ``condition`` until it returns something truthy (returned); fail naming
    ``what``, with the processes' logs, at ``deadline`` or when a process exits."""
    while True:
        value = condition()
        if value:
            return value
        for process in processes:
            if process.poll() is not None:
                pytest.fail(f"{process.args[0]} exited {process.returncode} while waiting for "
                            f"{what}\n{tail(cluster)}")  # fmt: skip
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {DEADLINE_S} s\n{tail(cluster)}")
        time.sleep(0.5)


def land(cluster: Cluster) -> tuple[str, str]:
    """The example blueprint put in the s3:// landing zone: (file name, its kernel id)."""
    path = next(p for p in example_blueprint_files() if p.name.split(".")[0] == BLUEPRINT)
    data = path.read_bytes()
    wiring.landing_zone(Settings.from_env(cluster.env)).put(path.name, data)
    kernel_id = kernel_id_for(parse_blueprint(data, source=path.name, expected_name=BLUEPRINT))
    return path.name, kernel_id


def sensor_run(instance: dg.DagsterInstance) -> dg.DagsterRun | None:
    runs = instance.get_runs(dg.RunsFilter(tags={SENSOR_NAME_TAG: "new_blueprints"}))
    return runs[0] if runs else None


def sensor_ticks(instance: dg.DagsterInstance) -> list:
    states = [s for s in instance.all_instigator_state() if s.instigator_name == "new_blueprints"]
    if not states:
        return []
    return list(instance.get_ticks(states[0].instigator_origin_id, states[0].selector_id))


def failures(instance: dg.DagsterInstance, run_id: str) -> str:
    return "\n".join(
        str(r.dagster_event.message)
        for r in instance.all_logs(run_id)
        if r.dagster_event and r.dagster_event.is_failure
    )


@pytest.mark.timeout(DEADLINE_S + 60)
def test_the_daemon_runs_what_the_sensor_asks_for_on_postgres(cluster: Cluster):
    file_name, kernel_id = land(cluster)
    port = int(cluster.env["DAGSTER_CODE_LOCATION_PORT"])
    code_server_args = [
        "dagster", "code-server", "start", "-m", "esper_assets.defs",
        "-h", "127.0.0.1", "-p", str(port), "--location-name", "esper_assets",
    ]  # fmt: skip
    daemon_args = ["dagster-daemon", "run", "-w", str(REPO_ROOT / "deploy" / "workspace.yaml")]
    instance = dg.DagsterInstance.from_config(str(cluster.dagster_home))  # makes the tables
    try:
        deadline = time.monotonic() + DEADLINE_S
        with started(code_server_args, cluster, "code_server") as code_server:
            # The code server opens its port once the code location has loaded.
            wait_for(lambda: port_open(port), "code server", deadline, cluster, code_server)
            with started(daemon_args, cluster, "daemon") as daemon:
                processes = (code_server, daemon)
                run = wait_for(
                    lambda: (r := sensor_run(instance)) is not None and r.status in TERMINAL and r,
                    "finished run of the new_blueprints sensor", deadline, cluster, *processes,
                )  # fmt: skip
                ticks = wait_for(
                    lambda: [t for t in sensor_ticks(instance) if run.run_id in t.run_ids],
                    "tick of the new_blueprints sensor naming the run", deadline, cluster,
                    *processes,
                )  # fmt: skip
                pids = {os.getpid(), code_server.pid, daemon.pid}
        assert run.status == dg.DagsterRunStatus.SUCCESS, (
            f"run {run.run_id} ended {run.status}: {failures(instance, run.run_id)}\n"
            f"{tail(cluster)}"
        )
        records = instance.all_logs(run.run_id)
        events = [r.dagster_event for r in records if r.dagster_event]
    finally:
        instance.dispose()

    # The sensor's tick requested it (one run per landed file content), for the code
    # location the workspace names ...
    assert run.job_name == "ingest_blueprints"
    assert run.tags["esper/file"] == file_name
    assert run.tags[RUN_KEY_TAG]
    assert run.tags["dagster/code_location"] == "esper_assets"
    assert ticks[0].status.value == "SUCCESS"
    # ... the queued coordinator queued it and the daemon dequeued it (RUN_STARTING is
    # the dequeue), and the default launcher had the code server of deploy/workspace.yaml
    # start it in a run worker process of its own (not the daemon, the code server or us).
    assert json.loads(run.tags[GRPC_INFO_TAG]) == {"host": "127.0.0.1", "port": port}
    lifecycle = [
        dg.DagsterEventType.RUN_ENQUEUED, dg.DagsterEventType.RUN_STARTING,
        dg.DagsterEventType.RUN_START, dg.DagsterEventType.RUN_SUCCESS,
    ]  # fmt: skip
    assert [e.event_type for e in events if e.event_type in lifecycle] == lifecycle
    worker = next(e.pid for e in events if e.event_type == dg.DagsterEventType.RUN_START)
    assert worker not in pids
    assert f"Started process for run (pid: {worker})." in [e.message for e in events]
    materialized = {
        (e.asset_key.to_user_string(), e.partition)
        for e in events
        if e.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION
    }
    assert {("blueprints", BLUEPRINT), ("compiled_kernels", BLUEPRINT)} <= materialized
    # The run worked on the services alone: the kernel is registered in PostgreSQL, and
    # nothing was written under ESPER_HOME.
    with wiring.open_repository(Settings.from_env(cluster.env)) as repo:
        assert find_kernel(repo, kernel_id) == kernel_id
    assert not Path(cluster.env["ESPER_HOME"]).exists()
    # The password is in no process's output, no event and no tag or run config.
    shown = [path.read_text(errors="replace") for path in cluster.logs.glob("*.log")]
    shown += [f"{r.user_message} {r.dagster_event and r.dagster_event.message}" for r in records]
    shown += [json.dumps(run.tags), json.dumps(run.run_config, default=str)]
    assert not [text for text in shown if cluster.secret in text]
