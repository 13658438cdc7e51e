"""``esper bench pipeline``: the Dagster pipeline end to end, on the embedded default.

1. N small blueprints landed and materialized as one single-run backfill
   (blueprints -> compiled_kernels, both checks), against parse + compile of the
   same blueprints with no Dagster and no storage: the difference per blueprint is
   what orchestration, registration and caching cost.
2. The new_blueprints sensor: one tick over 10,000 files it has already seen, then
   one with 100 new files among them, against a bare directory listing.

Runs on Settings of its own: a fresh, temporary ESPER_HOME and no service, and
the embedded Dagster instance under it; the environment's ESPER_* variables and
DAGSTER_HOME are not used, and nothing is written to the environment.

``instances=("embedded", "postgres")`` runs the backfill twice, side by side: on the
embedded instance, and on the production instance (the repository's
``deploy/dagster.yaml``: PostgreSQL storage) in a throwaway database created on the
server ``postgres_url`` names and dropped afterwards, so no real instance is touched.
Only the Dagster instance differs between the two: esper's own storage stays embedded.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import dagster as dg

from esper_assets.blueprints import compile_blueprint, parse_blueprint
from esper_assets.defs import build_definitions, embedded_dagster_home, new_blueprints
from esper_assets.defs._compat import pool_postgres_connections
from esper_assets.errors import ConfigError, InvalidInput
from esper_assets.flows.wiring import landing_zone
from esper_assets.runner import backfill
from esper_assets.settings import Settings


def small_blueprint(i: int, prefix: str = "bench") -> tuple[str, bytes]:
    """A small MLP, different for every ``i`` (so each compiles to its own kernel)."""
    width = 16 + (i % 48)
    doc = {
        "name": f"{prefix}_{i:05d}",
        "version": f"1.0.{i}",
        "tags": ["bench", f"family-{i % 20}"],
        "description": f"benchmark blueprint {i}",
        "input_shape": [32],
        "layers": [
            {"op": "linear", "out_features": width},
            {"op": "relu"},
            {"op": "linear", "out_features": 32},
            {"op": "residual"},
        ],
        "properties": {"target": "cpu", "seed": i},
    }
    return f"{doc['name']}.json", json.dumps(doc).encode()


@contextmanager
def embedded_settings() -> Iterator[Settings]:
    """Settings for a fresh, temporary ESPER_HOME and nothing else: no service, the
    landing zone under that home (whatever the environment says)."""
    with TemporaryDirectory(prefix="esper-bench-pipeline-") as tmp:
        yield Settings.from_env({"ESPER_HOME": tmp})


def embedded_pipeline(settings: Settings) -> tuple[dg.Definitions, dg.DagsterInstance]:
    """The Definitions bound to ``settings`` and the embedded instance under its home
    (never ``$DAGSTER_HOME``'s: the bench must not touch a real instance)."""
    instance = dg.DagsterInstance.from_config(str(embedded_dagster_home(settings)))
    return build_definitions(settings), instance


def bench_backfill(
    n: int, instances: tuple[str, ...] = ("embedded",), postgres_url: str | None = None
) -> dict[str, Any]:
    """The backfill of ``n`` blueprints on each Dagster instance kind in ``instances``
    (``embedded``, ``postgres``), against parse + compile alone."""
    files = [small_blueprint(i) for i in range(n)]
    start = time.perf_counter()
    compile_ms = 0.0
    for key, data in files:  # the same work with no Dagster and no storage
        compile_ms += compile_blueprint(parse_blueprint(data, source=key)).compile_ms
    bare_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "blueprints": n,
        "parse_and_compile_only_s": round(bare_s, 2),
        "compile_ms_total": round(compile_ms, 1),
        "target": "<= 30 s for 1,000; the production instance within 1.5x of the embedded",
    }
    for kind in instances:
        result[kind] = _backfill_on(kind, files, bare_s, postgres_url)
    if {"embedded", "postgres"} <= set(instances):
        ratio = result["postgres"]["pipeline_s"] / result["embedded"]["pipeline_s"]
        result["postgres_vs_embedded"] = round(ratio, 2)
        result["postgres"]["ok"] = result["postgres"]["ok"] and ratio <= 1.5
    return result


def _backfill_on(
    kind: str, files: list[tuple[str, bytes]], bare_s: float, postgres_url: str | None
) -> dict[str, Any]:
    with embedded_settings() as settings:
        landing = landing_zone(settings)
        for key, data in files:
            landing.put(key, data)
        with dagster_instance(kind, settings, postgres_url) as instance:
            start = time.perf_counter()
            outcome = backfill(
                build_definitions(settings), instance, [k.removesuffix(".json") for k, _ in files]
            )
            pipeline_s = time.perf_counter() - start
    n = len(files)
    return {
        "success": outcome.success,
        "checks": outcome.checks,
        "error": outcome.error,
        "pipeline_s": round(pipeline_s, 2),
        "overhead_per_blueprint_ms": round((pipeline_s - bare_s) * 1000 / n, 2),
        "ok": outcome.success and (n < 1000 or pipeline_s <= 30),
    }


@contextmanager
def dagster_instance(
    kind: str, settings: Settings, postgres_url: str | None = None
) -> Iterator[dg.DagsterInstance]:
    """The embedded instance under ``settings``' home, or the production one on a
    throwaway PostgreSQL database (created on ``postgres_url``'s server, then dropped)."""
    if kind == "embedded":
        with dg.DagsterInstance.from_config(str(embedded_dagster_home(settings))) as instance:
            yield instance
        return
    if kind != "postgres":
        raise InvalidInput(f"instance {kind!r} is not embedded or postgres")
    if not postgres_url:
        raise ConfigError(
            "the postgres instance needs a PostgreSQL server: pass --postgres-url or set "
            "ESPER_DATABASE_URL (a throwaway database is created there and dropped after)"
        )
    with throwaway_database(postgres_url) as url, _production_instance(url) as instance:
        yield instance


@contextmanager
def throwaway_database(server_url: str) -> Iterator[str]:
    """A new, empty database on ``server_url``'s server (its URL), dropped on exit."""
    import psycopg

    name = f"esper_bench_dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}", query=""))
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextmanager
def _production_instance(database_url: str) -> Iterator[dg.DagsterInstance]:
    """deploy/dagster.yaml, as a deployment uses it, on ``database_url``. It reads the
    DAGSTER_PG_* variables while the instance is built; they are set only for that
    moment (so the password stays out of any file), then restored."""
    source = Path(__file__).resolve().parents[2] / "deploy" / "dagster.yaml"
    if not source.is_file():
        raise ConfigError(f"{source} is missing: the postgres instance bench runs from a "
                          "checkout of the repository")  # fmt: skip
    parts = urlsplit(database_url)
    pg_env = {
        "DAGSTER_PG_HOST": parts.hostname or "127.0.0.1", "DAGSTER_PG_PORT": str(parts.port or 5432),
        "DAGSTER_PG_DB": parts.path.lstrip("/"), "DAGSTER_PG_USER": unquote(parts.username or ""),
        "DAGSTER_PG_PASSWORD": unquote(parts.password or ""),
    }  # fmt: skip
    with TemporaryDirectory(prefix="esper-bench-instance-") as home:
        shutil.copyfile(source, Path(home) / "dagster.yaml")
        saved = {name: os.environ.get(name) for name in pg_env}
        os.environ.update(pg_env)
        try:
            instance = dg.DagsterInstance.from_config(home)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        with pool_postgres_connections(instance):  # as esper's own processes do
            yield instance


def bench_sensor(seen: int, new: int, repeats: int = 5) -> dict[str, Any]:
    with embedded_settings() as settings:
        landing = landing_zone(settings)
        for i in range(seen):
            landing.put(*small_blueprint(i, "seen"))
        defs, instance = embedded_pipeline(settings)

        def tick(cursor: str | None) -> tuple[float, Any]:
            start = time.perf_counter()
            with dg.build_sensor_context(
                instance=instance, cursor=cursor, resources=defs.resources
            ) as context:
                result = new_blueprints(context)
            return (time.perf_counter() - start) * 1000, result

        first_ms, first = tick(None)  # sees all files once
        idle = [tick(first.cursor)[0] for _ in range(repeats)]
        listing = [_timed(lambda: landing.list_blueprints()) for _ in range(repeats)]
        for i in range(new):
            landing.put(*small_blueprint(i, "fresh"))
        busy_runs = [tick(first.cursor) for _ in range(repeats)]
    busy_requests = len(busy_runs[0][1].run_requests)
    idle_ms = statistics.median(idle)
    busy_ms = statistics.median(ms for ms, _ in busy_runs)
    return {
        "files_seen": seen,
        "new_files": new,
        "first_tick_all_new_ms": round(first_ms, 1),
        "first_tick_requests": len(first.run_requests),
        "tick_nothing_new_ms": round(idle_ms, 1),
        "tick_with_new_ms": round(busy_ms, 1),
        "tick_with_new_requests": busy_requests,
        "raw_listing_ms": round(statistics.median(listing), 1),
        "cursor_bytes": len(first.cursor or ""),
        "targets": {
            "nothing new <= 1000 ms": idle_ms <= 1000,
            "100 new <= 2000 ms": busy_ms <= 2000,
        },
    }


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def run(
    quick: bool = False,
    progress: Callable[[str], None] = lambda _: None,
    instances: tuple[str, ...] = ("embedded",),
    postgres_url: str | None = None,
) -> dict[str, Any]:
    n, seen = (100, 1000) if quick else (1000, 10_000)
    progress(f"backfill of {n} blueprints on the {' and '.join(instances)} instance")
    backfill_result = bench_backfill(n, instances, postgres_url)
    progress(f"sensor ticks over {seen} files")
    sensor_result = bench_sensor(seen, 100)
    return {"benchmark": "pipeline", "quick": quick, "backfill": backfill_result,
            "sensor": sensor_result}  # fmt: skip
