"""The ``esper`` command: one click group per area, registered on :func:`main`.

- ``pipeline``: ``demo``, ``ingest``, ``lineage``, ``dagster-home`` (through ``runner``)
- ``cache``: ``cache demo|stats|health|cleanup|warm``
- ``health``: every cache tier's status and latency, with a write-read-delete probe
- ``repository``: ``assets search|show|lineage|deprecate|analytics``
- ``db``: ``migrate``
- ``checkpoints``: ``checkpoints list|show|save|restore|verify``
- ``bench``: ``bench cache|repository|pipeline`` (through ``esper_assets.bench``)
- ``analytics``: ``analytics query|shell`` (SQL over the usage files, read only)
- ``serve``: the HTTP API of ``esper_assets.api`` on uvicorn
- ``render``: how every command prints (JSON or tables) and the one way an
  ``EsperError`` is reported (one line on stderr, exit 2)

Settings come from ``Settings.from_env()``; storage objects are built by
``flows.wiring``. Heavy imports (storage, Dagster) happen inside the commands, so
``esper --help`` stays fast.

May import: ``errors``, ``settings``, ``storage``, ``flows``, ``runner``, ``bench``,
and ``esper_assets.defs`` through the package's public names only. Nothing imports
the CLI.
"""

from __future__ import annotations

import logging

import click

from esper_assets.cli import (
    analytics,
    bench,
    cache,
    checkpoints,
    db,
    health,
    pipeline,
    repository,
    serve,
)
from esper_assets.cli.render import EsperGroup

__all__ = ["main"]


@click.group(cls=EsperGroup)
@click.option("-v", "--verbose", is_flag=True, help="Log what the storage layer does.")
def main(verbose: bool) -> None:
    """Esper assets: blueprints, kernels and checkpoints with a multi-tier cache."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


for command in (
    *pipeline.COMMANDS,
    db.migrate,
    cache.cache,
    health.health,
    repository.assets,
    checkpoints.checkpoints,
    bench.bench,
    analytics.analytics,
    serve.serve,
):
    main.add_command(command)
