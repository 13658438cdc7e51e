"""``esper serve``: the HTTP API (esper_assets.api) on uvicorn."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from esper_assets.settings import Settings

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 64),
    help="Worker processes, each with its own cache L1 and connections.",
)  # fmt: skip
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))  # fmt: skip
def serve(host: str, port: int, workers: int, log_level: str) -> None:
    """Serve kernels, search, lineage and cache upkeep over HTTP (Starlette on uvicorn).

    Mutating routes need ESPER_API_TOKEN set (clients send it as a bearer token);
    without it they are refused. The OpenAPI document is at /api/v1/openapi.json;
    Prometheus metrics (all workers together) at /metrics.
    """
    import uvicorn

    settings = Settings.from_env()  # a bad variable: one line and exit 2, before uvicorn
    with metrics_dir(settings.metrics_dir):
        uvicorn.run(
            "esper_assets.api:app_from_env", factory=True, host=host, port=port,
            workers=workers, log_level=log_level, access_log=False,
        )  # fmt: skip


@contextmanager
def metrics_dir(given: Path | None) -> Iterator[str]:
    """The ``PROMETHEUS_MULTIPROC_DIR`` every worker writes its metrics to (GET /metrics
    sums them): the operator's (``given``, Settings.metrics_dir), emptied of an earlier
    run's files first, or one made for this run and removed after it.

    A made one is handed on through this process's environment, set before
    prometheus-client is imported (uvicorn imports the app, and the app imports it,
    after this): prometheus-client chooses its multiprocess mode from that variable when
    it is imported, and uvicorn's workers are processes it starts with the factory's
    name only, so the environment they inherit is the one way to tell them."""
    if given is not None:
        for old in given.glob("*.db"):
            old.unlink(missing_ok=True)
        yield str(given)
        return
    made = tempfile.mkdtemp(prefix="esper-metrics-")
    os.environ[MULTIPROC_DIR] = made
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)
