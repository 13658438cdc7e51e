"""The daemon stand-in: ``tick_and_run`` evaluates the new_blueprints sensor and
executes its runs in process; ``run_ingest`` and ``run_demo`` are ``esper ingest``
and ``make demo``. Used by the CLI, the bench and the tests.

May import: everything below it, and ``esper_assets.defs`` through the package's
public names only.
"""

from esper_assets.runner.driver import (
    FileOutcome,
    RunOutcome,
    TickReport,
    backfill,
    dagster_lineage,
    land_examples,
    run_demo,
    run_ingest,
    tick_and_run,
)

__all__ = [
    "FileOutcome",
    "RunOutcome",
    "TickReport",
    "backfill",
    "dagster_lineage",
    "land_examples",
    "run_demo",
    "run_ingest",
    "tick_and_run",
]
