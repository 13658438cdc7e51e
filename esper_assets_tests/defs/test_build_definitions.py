"""build_definitions(settings): the code location is built from the Settings it is given
(the environment's only when given none), its resources name the variables a value came
from, and its domains merge into the one location with the names Dagster has stored."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import dagster as dg
import pytest

import esper_assets.defs
from esper_assets.defs import DOMAINS, OWNERS, build_definitions
from esper_assets.defs.resources import RedisResource
from esper_assets.errors import ConfigError
from esper_assets.settings import Settings


def test_settings_passed_in_win_over_the_environment(esper_home: Path, tmp_path: Path):
    mine = Settings.from_env({"ESPER_HOME": str(tmp_path / "mine")})
    resources = build_definitions(mine).resources
    assert resources["database"].home == str(tmp_path / "mine")
    assert resources["object_store"].home == str(tmp_path / "mine")
    assert resources["landing"].location == mine.landing
    assert build_definitions().resources["database"].home == str(esper_home)


def test_a_value_from_the_environment_is_named_never_held(esper_home, monkeypatch):
    secret_url = "postgresql://esper:s3cret@db.invalid:5432/esper"
    monkeypatch.setenv("ESPER_DATABASE_URL", secret_url)
    monkeypatch.setenv("ESPER_REDIS_URL", "redis://cache.invalid:6379/0")
    from_env = build_definitions().resources
    assert from_env["database"].url == dg.EnvVar("ESPER_DATABASE_URL")
    assert from_env["redis"].data["url"] == dg.EnvVar("ESPER_REDIS_URL")
    assert "s3cret" not in repr(from_env)
    # A value the caller chose (not the environment's) is held as given.
    other = dataclasses.replace(Settings.from_env(), redis_url="redis://other.invalid:6379/1")
    held = build_definitions(other).resources["redis"].data["url"]
    assert held == "redis://other.invalid:6379/1"


def test_one_redis_resource_serves_the_location_and_the_cache(esper_home):
    resources = build_definitions().resources
    assert resources["kernel_cache"].redis is resources["redis"]
    assert resources["kernel_cache"].database is resources["database"]
    assert resources["repository"].object_store is resources["object_store"]


def _cache_tiers_in_a_run(defs: dg.Definitions, run_config: dict | None = None) -> set[str]:
    """The tiers the cache of a cache_maintenance_job run cleaned (l2 when it had Redis)."""
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("cache_maintenance_job").execute_in_process(
            instance=instance, run_config=run_config
        )
    assert result.success
    return set(result.output_for_node("clean_kernel_cache"))


def test_the_redis_a_run_is_given_is_the_one_its_cache_uses(esper_home, redis_server_url):
    defs = build_definitions()
    assert "l2" not in _cache_tiers_in_a_run(defs)  # nothing set: no Redis
    # Run config for the location's ``redis`` (the UI's launchpad) reaches the cache:
    # Dagster hands a resource nested at launch the run's own top-level one.
    launchpad = {"resources": {"redis": {"config": {"url": redis_server_url}}}}
    assert "l2" in _cache_tiers_in_a_run(defs, launchpad)
    # So does a redis override: the cache is built on the replacement.
    replaced = build_definitions(redis=RedisResource(url=redis_server_url))
    assert replaced.resources["kernel_cache"].redis is replaced.resources["redis"]
    assert "l2" in _cache_tiers_in_a_run(replaced)


def test_resource_overrides_replace_by_name(esper_home):
    from esper_assets.defs.resources import BlueprintRulesResource

    strict = BlueprintRulesResource(max_layers=2)
    assert build_definitions(blueprint_rules=strict).resources["blueprint_rules"] is strict


def test_domains_merge_into_the_stored_names(esper_home):
    defs = build_definitions()
    assert {j.name for j in defs.jobs} == {
        "ingest_blueprints", "cache_maintenance_job", "warm_kernel_cache_job",
        "revalidate_blueprints_job", "cache_health_job", "verify_checkpoints", "checkpoint_retention_job",
        "platform_state_job", "analytics_daily",
    }  # fmt: skip
    assert {k.to_user_string() for a in defs.assets for k in (a.keys if isinstance(a, dg.AssetsDefinition) else [a.key])} == {
        "blueprints", "compiled_kernels", "checkpoints", "usage_events_daily",
        "kernel_usage_daily", "cache_warm_list", "retirement_candidates", "asset_inventory",
    }  # fmt: skip
    assert esper_assets.defs.blueprint_partitions.name == "blueprints"
    dg.Definitions.validate_loadable(defs)


def test_a_bad_variable_fails_the_build_not_the_import(esper_home, monkeypatch):
    monkeypatch.setenv("ESPER_REDIS_URL", "http://wrong.invalid")
    with pytest.raises(ConfigError, match="ESPER_REDIS_URL"):
        build_definitions()


def test_the_package_exports_what_runner_cli_and_bench_use():
    for name in esper_assets.defs.__all__:
        assert hasattr(esper_assets.defs, name), name


def test_every_asset_has_the_team_as_owner_and_its_domain_as_tag(esper_home):
    defs = build_definitions()
    domain_of = {  # a domain's assets: AssetsDefinitions (keys) or AssetSpecs (key)
        key: name
        for name, d in DOMAINS.items()
        for a in d.assets or []
        for key in getattr(a, "keys", None) or [a.key]
    }
    specs = defs.resolve_all_asset_specs()
    assert {s.key for s in specs} == set(domain_of) and len(specs) >= 8
    for spec in specs:
        assert set(OWNERS) <= set(spec.owners), spec.key
        assert spec.tags.get("domain") == domain_of[spec.key], spec.key
    graph = defs.resolve_asset_graph()  # what the code location serves (the UI's view)
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert "team:esper" in node.owners and node.tags["domain"] == domain_of[key], key


def test_owning_the_assets_keeps_everything_else_the_domains_define(esper_home):
    plain = dg.Definitions.merge(
        *DOMAINS.values(), dg.Definitions(resources=build_definitions().resources)
    )
    owned = build_definitions()
    for what in ("jobs", "schedules", "sensors"):
        assert {d.name for d in getattr(owned, what)} == {d.name for d in getattr(plain, what)}
    assert (
        owned.resolve_asset_graph().asset_check_keys == plain.resolve_asset_graph().asset_check_keys
    )
    for spec in plain.resolve_all_asset_specs():  # kinds, groups, partitions as they were
        mine = owned.resolve_assets_def(spec.key).specs_by_key[spec.key]
        assert (mine.kinds, mine.group_name, mine.partitions_def, mine.code_version) == (
            spec.kinds,
            spec.group_name,
            spec.partitions_def,
            spec.code_version,
        )
