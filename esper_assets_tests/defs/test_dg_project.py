"""The Dagster project from the repository root, the way a Dagster user runs it.

Each test copies the root's config files (``dagster.yaml``, ``pyproject.toml``,
``workspace.yaml``) into a folder of its own, with ``esper_assets`` linked in (dg
looks for the project's modules under the project root), and runs the real
commands there in a clean environment: no ``ESPER_*``, no ``DAGSTER_*``, ESPER_HOME
in tmp_path. Run from the root itself, they would write the developer's
``.esper/dagster`` (the root ``dagster.yaml`` points there).

- nothing set: ``dg check defs``, ``dg list defs``, ``dagster definitions validate``
  (with and without ``-w workspace.yaml``) load the code location ``esper_assets``
  on the root ``dagster.yaml``'s instance, which is laid out like the embedded one;
- DAGSTER_HOME holding a copy of ``deploy/dagster.yaml`` and DAGSTER_PG_* on a fresh
  PostgreSQL database: the same commands succeed on that instance;
- ``dg dev`` serves the asset graph over GraphQL (started, queried, stopped).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest
import yaml

from esper_assets_tests.conftest import free_port
from esper_assets_tests.process_groups import default_signals, stop_group

pytestmark = pytest.mark.slow  # each test runs dg/dagster commands in subprocesses: 20-30 s

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMAND_TIMEOUT_S = 150
SERVER_START_S = 90

ANALYTICS = {"usage_events_daily", "kernel_usage_daily", "cache_warm_list",
             "retirement_candidates", "asset_inventory"}  # fmt: skip
ASSETS = {"blueprints", "compiled_kernels", "checkpoints"} | ANALYTICS
ANALYTICS_CHECKS = {
    "usage_events_daily:schema", "usage_events_daily:non_empty", "usage_events_daily:fresh",
    "kernel_usage_daily:schema", "kernel_usage_daily:non_empty", "kernel_usage_daily:fresh",
    "cache_warm_list:schema", "cache_warm_list:non_empty", "cache_warm_list:fresh",
    "retirement_candidates:schema", "retirement_candidates:fresh", "asset_inventory:schema",
}  # fmt: skip
CHECKS = {
    "blueprints:blueprint_is_valid",
    "compiled_kernels:kernel_round_trip",
    "compiled_kernels:registered_blueprints_still_valid",
    "compiled_kernels:kernel_cache_healthy",
    "checkpoints:checkpoint_restorable",
} | ANALYTICS_CHECKS
JOBS = {
    "ingest_blueprints",
    "cache_maintenance_job",
    "warm_kernel_cache_job",
    "revalidate_blueprints_job",
    "cache_health_job",
    "verify_checkpoints",
    "checkpoint_retention_job",
    "platform_state_job",
    "analytics_daily",
}
SCHEDULES = {
    "hourly_cache_maintenance",
    "warm_cache_every_15_minutes",
    "nightly_blueprint_revalidation",
    "cache_health_every_15_minutes",
    "daily_checkpoint_retention",
    "platform_state_every_30_minutes",
    "analytics_daily_at_0030",
}
SENSORS = {"new_blueprints", "new_checkpoints"}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository root's Dagster config, with the package linked in."""
    root = tmp_path / "project"
    root.mkdir()
    for name in ("dagster.yaml", "pyproject.toml", "workspace.yaml"):
        shutil.copyfile(REPO_ROOT / name, root / name)
    (root / "esper_assets").symlink_to(REPO_ROOT / "esper_assets", target_is_directory=True)
    return root


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a fresh shell in the project's venv: no ESPER_* or DAGSTER_*
    (ESPER_HOME in tmp_path, so nothing lands in the repository's .esper)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ESPER_", "DAGSTER_", "AWS_")) and k != "VIRTUAL_ENV"
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = sys.prefix  # as after `source .venv/bin/activate`
    env["ESPER_HOME"] = str(tmp_path / "esper")
    return env


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )
    return result


def check_every_command(root: Path, env: dict[str, str]) -> None:
    checked = run(["dg", "check", "defs"], root, env)
    assert "All definitions loaded successfully." in checked.stdout

    listed = json.loads(run(["dg", "list", "defs", "--json"], root, env).stdout)
    assert {a["asset_key"] for a in listed["assets"]} == ASSETS
    assert {c["key"] for c in listed["asset_checks"]} == CHECKS
    assert {j["name"] for j in listed["jobs"]} == JOBS
    assert {s["name"] for s in listed["schedules"]} == SCHEDULES
    assert {s["name"] for s in listed["sensors"]} == SENSORS

    for args in (
        ["dagster", "definitions", "validate"],  # [tool.dagster] in pyproject.toml
        ["dagster", "definitions", "validate", "-w", "workspace.yaml"],
    ):
        validated = run(args, root, env)
        log = validated.stdout + validated.stderr
        assert "Validation successful for code location esper_assets." in log, log[-4000:]
        assert "DAGSTER_PG" not in log


# -- the module Dagster loads ---------------------------------------------------------------
IMPORT_THEN_LOAD = """
import esper_assets.defs as module
from dagster.components.definitions import LazyDefinitions
from esper_assets.errors import ConfigError

assert isinstance(module.esper_definitions, LazyDefinitions)
try:
    module.esper_definitions()
except ConfigError as exc:
    print("load failed:", exc)
"""


def test_importing_the_code_location_reads_no_environment(clean_env, tmp_path):
    """A bad variable does not stop the import; the load reports it, by name. Dagster
    calls the module's one @dg.definitions function when it loads the location."""
    env = clean_env | {"ESPER_DATABASE_URL": "mysql://somewhere/db"}
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_THEN_LOAD],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("load failed: ESPER_DATABASE_URL=")


# -- nothing set: the root dagster.yaml ------------------------------------------------------
@pytest.mark.timeout(300)
def test_dg_and_dagster_commands_work_from_the_root_with_nothing_set(project, clean_env):
    check_every_command(project, clean_env)
    # The instance was the root dagster.yaml's: under the project's .esper/dagster,
    # and Dagster's throwaway home next to it is gone again.
    history = project / ".esper" / "dagster" / "history"
    assert (history / "runs.db").is_file() and (history / "event_log.db").is_file()
    assert (project / ".esper" / "dagster" / "schedules" / "schedules.db").is_file()
    assert not list(project.glob(".tmp_dagster_home_*"))
    assert not (Path(clean_env["ESPER_HOME"]) / "dagster").exists()


def _storages(ref) -> dict[str, tuple[str, str, str]]:
    """Each storage of an InstanceRef: (module, class, absolute base_dir)."""

    def entry(module: str, cls: str, config_yaml: str) -> tuple[str, str, str]:
        return module, cls, os.path.abspath(yaml.safe_load(config_yaml)["base_dir"])

    composite = yaml.safe_load(ref.storage_data.config_yaml)
    out = {
        name: entry(c["module_name"], c["class_name"], c["config_yaml"])
        for name, c in composite.items()
    }
    for name, data in (
        ("local_artifact_storage", ref.local_artifact_storage_data),
        ("compute_logs", ref.compute_logs_data),
    ):
        out[name] = entry(data.module_name, data.class_name, data.config_yaml)
    return out


def test_the_root_instance_is_the_embedded_instance_of_the_default_esper_home(project, monkeypatch):
    """`dg dev` from the root and `make dev` (ESPER_HOME left at ./.esper) share one
    instance: the root dagster.yaml names the storages Dagster gives ESPER_HOME/dagster
    with the dagster.yaml esper writes there."""
    from esper_assets.defs._compat import dagster_private
    from esper_assets.defs.instance import embedded_dagster_home
    from esper_assets.settings import Settings

    InstanceRef = dagster_private("InstanceRef")  # noqa: N806 - a class
    monkeypatch.chdir(project)  # relative paths in the root dagster.yaml: from where dg runs
    throwaway = tempfile.mkdtemp(prefix=".tmp_dagster_home_", dir=project)
    root_ref = InstanceRef.from_dir(throwaway, config_dir=str(project))
    home = embedded_dagster_home(Settings.from_env({"ESPER_HOME": str(project / ".esper")}))
    embedded_ref = InstanceRef.from_dir(str(home))

    assert _storages(root_ref) == _storages(embedded_ref)
    assert root_ref.settings["telemetry"] == embedded_ref.settings["telemetry"]
    assert root_ref.settings["telemetry"] == {"enabled": False}
    # and nothing of it in the throwaway folder Dagster removes
    assert all(not base.startswith(throwaway) for *_, base in _storages(root_ref).values())


# -- production: DAGSTER_HOME with deploy/dagster.yaml ----------------------------------------
@pytest.fixture
def fresh_database(pg_server_url: str) -> Iterator[tuple[str, str]]:
    """(server URL, name of a database created for this test), dropped afterwards."""
    import psycopg

    name = f"esper_dg_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield pg_server_url, name
    finally:
        with psycopg.connect(pg_server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.postgres
@pytest.mark.timeout(300)
def test_the_commands_work_on_the_production_instance(project, clean_env, tmp_path, fresh_database):
    import psycopg

    server, database = fresh_database
    parts = urlsplit(server)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "deploy" / "dagster.yaml", home / "dagster.yaml")
    env = clean_env | {
        "DAGSTER_HOME": str(home),
        "DAGSTER_PG_HOST": parts.hostname or "127.0.0.1",
        "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_DB": database,
        "DAGSTER_PG_USER": unquote(parts.username or "postgres"),
        "DAGSTER_PG_PASSWORD": unquote(parts.password or ""),
    }

    check_every_command(project, env)

    # The instance was deploy/dagster.yaml's: Dagster's tables are in the fresh
    # database, and the root dagster.yaml's SQLite instance was not made.
    db_url = urlunsplit(parts._replace(path=f"/{database}", query=""))
    with psycopg.connect(db_url) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert {"runs", "event_logs", "jobs", "job_ticks"} <= tables
    assert not (project / ".esper").exists()


# -- dg dev --------------------------------------------------------------------------------
GRAPHQL_QUERY = """
{
  assetNodes {
    assetKey { path }
    owners { ... on TeamAssetOwner { team } ... on UserAssetOwner { email } }
    tags { key value }
    assetChecksOrError { ... on AssetChecks { checks { name } } }
  }
  workspaceOrError { ... on Workspace { locationEntries {
    name
    locationOrLoadError { ... on RepositoryLocation { repositories {
      schedules { name scheduleState { status } }
      allTopLevelResourceDetails { name nestedResources { name type resource { name } } }
    } } }
  } } }
}
"""
# What the UI shows a schedule as before anyone turns it on or off (its default).
SCHEDULE_STATUS = {
    "hourly_cache_maintenance": "RUNNING",
    "warm_cache_every_15_minutes": "RUNNING",
    "nightly_blueprint_revalidation": "RUNNING",
    "cache_health_every_15_minutes": "RUNNING",
    "daily_checkpoint_retention": "STOPPED",
    "platform_state_every_30_minutes": "STOPPED",
    "analytics_daily_at_0030": "STOPPED",
}


def _graphql(port: int) -> dict | None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": GRAPHQL_QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _stop(process: subprocess.Popen) -> None:
    """dg dev and everything it started (webserver, daemon, code servers) are one process
    group: Ctrl-C to all of it (dagster dev's own shutdown), then SIGKILL if need be."""
    stop_group(process, signal.SIGINT, 30)


@pytest.mark.timeout(300)
def test_dg_dev_serves_the_asset_graph_from_the_root_with_nothing_set(project, clean_env, tmp_path):
    port = free_port()
    log = tmp_path / "dg_dev.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(BIN / "dg"), "dev", "--host", "127.0.0.1", "--port", str(port)],
            cwd=project,
            env=clean_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_signals,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        answer = None
        while time.monotonic() < deadline and process.poll() is None:
            answer = _graphql(port)
            nodes = (answer or {}).get("data", {}).get("assetNodes") or []
            if {"/".join(n["assetKey"]["path"]) for n in nodes} >= ASSETS:
                break
            time.sleep(1)
        output = log.read_text(errors="replace")[-4000:]
        assert process.poll() is None, f"dg dev exited {process.returncode}:\n{output}"
        assert answer is not None, f"no GraphQL answer in {SERVER_START_S} s:\n{output}"
        data = answer["data"]
        assert {"/".join(n["assetKey"]["path"]) for n in data["assetNodes"]} == ASSETS
        locations = data["workspaceOrError"]["locationEntries"]
        assert [entry["name"] for entry in locations] == ["esper_assets"]
        for node in data["assetNodes"]:  # the UI's owner and tags of every asset
            key = "/".join(node["assetKey"]["path"])
            assert {"team": "esper"} in node["owners"], key
            assert any(t["key"] == "domain" for t in node["tags"]), key
        checks_on = {
            "/".join(n["assetKey"]["path"]): {c["name"] for c in n["assetChecksOrError"]["checks"]}
            for n in data["assetNodes"]
        }
        assert "registered_blueprints_still_valid" in checks_on["compiled_kernels"]
        [repository] = locations[0]["locationOrLoadError"]["repositories"]
        statuses = {s["name"]: s["scheduleState"]["status"] for s in repository["schedules"]}
        assert statuses == SCHEDULE_STATUS
        resources = {r["name"]: r for r in repository["allTopLevelResourceDetails"]}
        nested = {n["name"]: n for n in resources["kernel_cache"]["nestedResources"]}
        assert (nested["redis"]["type"], nested["redis"]["resource"]["name"]) == (
            "TOP_LEVEL",
            "redis",
        )
        assert (project / ".esper" / "dagster" / "history" / "runs.db").is_file()
    finally:
        _stop(process)
