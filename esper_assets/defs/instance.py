"""The embedded Dagster instance: SQLite under ``ESPER_HOME/dagster``.

A backfill of 1,000 blueprints writes about 4,000 events (a planned and a
materialized event per asset per partition). Dagster's default SQLite event log
wrote them at 10-20 ms each here: every event opens a new engine, writes two
files (the run's shard and the index) and fsyncs. The event log configured
here, ``EmbeddedEventLogStorage`` (defined in ``_compat``: it subclasses a
Dagster storage class), is Dagster's single-file SQLite event log with a pooled
engine, under WAL with ``synchronous=NORMAL``: a commit survives a crash of any
process, but the last few commits before a power cut may be lost. For a local, single-machine instance
that is the right trade (a 300-blueprint backfill: 28-40 ms per blueprint instead
of 192; figures in ``_compat``); production uses PostgreSQL
(``deploy/dagster.yaml``).
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

# dagster.yaml files name the class here (module esper_assets.defs.instance); it is
# defined, with Dagster's internals it relies on, in _compat.
from esper_assets.defs._compat import EmbeddedEventLogStorage, pool_postgres_connections
from esper_assets.settings import Settings

__all__ = ["EmbeddedEventLogStorage", "embedded_dagster_home", "instance_yaml", "local_instance"]


def instance_yaml(home: Path) -> str:
    return f"""\
# Embedded Dagster instance for esper_assets (written by esper; see
# esper_assets/defs/instance.py for why the event log is configured).
telemetry:
  enabled: false
event_log_storage:
  module: esper_assets.defs.instance
  class: EmbeddedEventLogStorage
  config:
    base_dir: {home / "history"}
"""


def embedded_dagster_home(settings: Settings | None = None) -> Path:
    """``ESPER_HOME/dagster``, with its ``dagster.yaml`` written if missing."""
    home = (settings or Settings.from_env()).home / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(instance_yaml(home))
    return home


def local_instance(settings: Settings | None = None) -> dg.DagsterInstance:
    """``$DAGSTER_HOME``'s instance when it is set (a PostgreSQL one with pooled
    connections: ``_compat.pool_postgres_connections``); else the embedded one."""
    if os.environ.get("DAGSTER_HOME"):
        return pool_postgres_connections(dg.DagsterInstance.get())
    return dg.DagsterInstance.from_config(str(embedded_dagster_home(settings)))
