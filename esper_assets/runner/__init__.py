"""Ticking the sensors on request, and the demo, for the CLI, the bench and the tests.

- ``driver``: ``tick_and_run`` ticks the new_blueprints sensor through the sensor
  daemon's own step on the code location ``esper_assets`` loaded in this process (its
  ticks in the sensor's history, its runs the location's, executed here before the
  tick returns; the cursor is Dagster's); ``backfill`` runs many partitions as one
  run, in process. Outcomes per run and per landed file (``RunOutcome``,
  ``FileOutcome``, ``TickReport``).
- ``checkpoints``: ``tick_checkpoints`` ticks the new_checkpoints sensor the same way:
  run partitions, a materialization per saved checkpoint, the verify runs;
  ``dagster_checkpoint`` reads one step's materialization back.
- ``lineage``: ``dagster_lineage``, a kernel's chain read from the event log alone.
- ``demo``: ``run_ingest`` (``esper ingest``), ``run_demo`` (``make demo``) and
  ``land_examples``; each takes ``Settings`` (default: the environment's).

Import from this package, not its modules. Nothing here prints.

May import: ``errors``, ``settings``, ``blueprints``, ``storage``, ``flows`` (objects
built by ``flows.wiring``), and ``esper_assets.defs`` through the package's public
names only. Imported by ``cli/``, ``bench/`` and tests; never by ``defs/``.
"""

from esper_assets.runner.checkpoints import (
    CheckpointTickReport,
    dagster_checkpoint,
    tick_checkpoints,
)
from esper_assets.runner.demo import land_examples, run_demo, run_ingest
from esper_assets.runner.driver import (
    FileOutcome,
    RunOutcome,
    TickReport,
    backfill,
    tick_and_run,
)
from esper_assets.runner.lineage import dagster_lineage

__all__ = [
    "CheckpointTickReport",
    "FileOutcome",
    "RunOutcome",
    "TickReport",
    "backfill",
    "dagster_checkpoint",
    "dagster_lineage",
    "land_examples",
    "run_demo",
    "run_ingest",
    "tick_and_run",
    "tick_checkpoints",
]
