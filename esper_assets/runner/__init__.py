"""The daemon stand-in: ``tick_and_run`` evaluates the new_blueprints sensor and
executes its runs in process; ``run_ingest`` and ``run_demo`` are ``esper ingest``
and ``make demo``. Used by the CLI, the bench and the tests.

May import: everything below it, and ``esper_assets.defs`` through the package's
public names only.
"""
