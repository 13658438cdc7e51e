"""The runner drives the code location as Dagster loads it: it keeps no cursor of its
own (a ``new_blueprints.cursor`` file an older runner left is adopted once, as the
sensor's cursor in Dagster), and definitions built on other settings are refused."""

from __future__ import annotations

import pytest

from esper_assets.blueprints import example_blueprint_files
from esper_assets.defs import build_definitions, embedded_dagster_home, local_instance
from esper_assets.errors import ConfigError
from esper_assets.flows.arrivals import Cursor
from esper_assets.flows.wiring import landing_zone
from esper_assets.runner import tick_and_run
from esper_assets.runner.driver import read_cursor
from esper_assets.settings import Settings


def test_an_older_runners_cursor_file_is_adopted_once(esper_home):
    settings = Settings.from_env()
    base = next(p for p in example_blueprint_files() if p.name == "mlp_base.json")
    landing_zone(settings).put(base.name, base.read_bytes())
    ahead = Cursor(stamp=2**62).dump()  # past every file: it has seen mlp_base.json
    old = embedded_dagster_home(settings) / "new_blueprints.cursor"
    old.write_text(ahead)
    with local_instance(settings) as instance:
        report = tick_and_run(build_definitions(settings), instance)
        assert report.runs == [] and report.ticks == 1  # without the file: one run
        assert not old.exists()
        assert Cursor.load(read_cursor(instance, "new_blueprints")).stamp == 2**62


def test_definitions_the_location_does_not_load_are_refused(esper_home, tmp_path):
    """The runs are the location's (loaded from this environment): definitions built on
    other settings would run as another version, so they are refused before any tick."""
    other = build_definitions(Settings.from_env({"ESPER_HOME": str(tmp_path / "other")}))
    with local_instance() as instance:
        with pytest.raises(ConfigError, match="another version of ingest_blueprints"):
            tick_and_run(other, instance)
        assert instance.get_runs() == [] and read_cursor(instance, "new_blueprints") is None
