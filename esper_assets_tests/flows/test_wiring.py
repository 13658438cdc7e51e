"""flows/wiring.py: the one place objects are built from Settings, and flows/upkeep.py:
the maintenance bodies without Dagster."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from esper_assets.blueprints import BlueprintLimits
from esper_assets.blueprints.examples import example_blueprint_files
from esper_assets.flows import kernels, upkeep, wiring
from esper_assets.flows.landing import DirectoryLanding, S3Landing
from esper_assets.settings import Settings
from esper_assets.storage import DirectoryObjectStore, S3ObjectStore


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Embedded settings under tmp_path, built without the environment."""
    return Settings.from_env({"ESPER_HOME": str(tmp_path / "home")})


def test_embedded_settings_build_embedded_objects(settings: Settings):
    store = wiring.object_store(settings)
    assert isinstance(store, DirectoryObjectStore) and store.location == str(settings.objects_dir)
    landing = wiring.landing_zone(settings)
    assert isinstance(landing, DirectoryLanding)
    assert landing.location == str(Path(settings.landing) / "blueprints")
    with wiring.open_repository(settings) as repo:
        assert repo.dialect == "sqlite"
    assert settings.sqlite_path.is_file()
    with wiring.open_cache(settings) as cache:
        assert cache.tiers == ["l1", "l3", "l4"]  # no Redis in these settings
        cache.put("kernel-1", b"bytes")
    with wiring.open_cache(settings, l1_size_mb=0) as cache:  # a CacheConfig override
        assert cache.tiers == ["l3", "l4"]
        assert cache.get("kernel-1") == b"bytes"  # the same L3 file


def test_s3_settings_build_s3_objects(tmp_path: Path, s3_endpoint: str, s3_bucket: str):
    settings = Settings.from_env({
        "ESPER_HOME": str(tmp_path), "ESPER_S3_BUCKET": s3_bucket, "ESPER_S3_PREFIX": "p",
        "AWS_ENDPOINT_URL": s3_endpoint, "ESPER_LANDING": f"s3://{s3_bucket}/in",
    })  # fmt: skip
    store = wiring.object_store(settings)
    assert isinstance(store, S3ObjectStore) and store.location == f"s3://{s3_bucket}/p/"
    store.put("a/b", b"x")
    assert store.get("a/b") == b"x"
    landing = wiring.landing_zone(settings)
    assert isinstance(landing, S3Landing)
    landing.put("mlp.yaml", b"name: mlp\n")
    assert landing.read("mlp.yaml") == b"name: mlp\n"
    client = wiring.s3_client(settings)
    config = client.meta.config
    assert (config.connect_timeout, config.retries["total_max_attempts"]) == (2.0, 1)
    assert wiring.object_store(settings, client).client is client  # a client passed in is used


def _registered_examples(settings: Settings) -> dict[str, str]:
    """Land, register and build every example; kernel id by name."""
    landing = wiring.landing_zone(settings)
    for path in example_blueprint_files():
        landing.put(path.name, path.read_bytes())
    names = sorted(kernels.landed_files(landing))
    with wiring.open_repository(settings) as repo, wiring.open_cache(settings) as cache:
        ingested = kernels.ingest_blueprints(repo, landing, names)
        assert all(r.valid for r in ingested), [r.problems for r in ingested]
        return {r.name: kernels.build_kernel(repo, cache, r.asset_id).kernel_id for r in ingested}


def _lose_the_hottest_kernel(settings: Settings, kernel_id: str) -> None:
    """Make ``kernel_id`` the cache's hottest kernel, then lose it from every tier."""
    from esper_assets.storage.cache.tiers.objects import kernel_object_key

    # Over the 1 MiB large-object threshold, L3 keeps only a pointer row (with the
    # access counts) and the value lives in L4 alone: deleting L4's file loses it.
    with wiring.open_cache(settings) as cache:
        cache.put(kernel_id, b"x" * (2 << 20))
        for _ in range(3):
            assert cache.get(kernel_id) is not None
    (settings.objects_dir / kernel_object_key(kernel_id)).unlink()


def test_upkeep_cleans_warms_and_restores_a_kernel_every_tier_lost(settings: Settings):
    built = _registered_examples(settings)
    some_id = next(iter(built.values()))
    _lose_the_hottest_kernel(settings, some_id)
    with wiring.open_cache(settings) as cache, wiring.open_repository(settings) as repo:
        report = upkeep.warm_most_used(cache, repo, n=1)
        assert report == {some_id: "repository"}
        assert cache.get(some_id) == repo.get_asset(some_id)[1]
        assert upkeep.outcome_counts(upkeep.warm_most_used(cache, repo, n=len(built))) == {
            "l1": 1, "l3": len(built) - 1,
        }  # fmt: skip
        done = upkeep.clean_cache(cache)
    assert done.removed == {"l1": 0, "l3": 0, "l4": 0} and done.flushed == 0
    assert done.entries["l3"] == len(built)


def test_warming_from_the_repository_is_not_counted_as_a_use(settings: Settings):
    some_id = next(iter(_registered_examples(settings).values()))
    _lose_the_hottest_kernel(settings, some_id)
    with wiring.open_repository(settings) as repo:
        before = repo.get_metadata(some_id)
    with wiring.open_cache(settings) as cache, wiring.open_repository(settings) as repo:
        assert upkeep.warm_most_used(cache, repo, n=1) == {some_id: "repository"}
        assert repo.flush_access() == 0  # the read it warmed from counted nothing
        after = repo.get_metadata(some_id)
    assert (after.access_count, after.last_accessed) == (before.access_count, before.last_accessed)


def test_upkeep_revalidation_names_what_today_s_rules_refuse(settings: Settings):
    _registered_examples(settings)
    with wiring.open_repository(settings) as repo:
        assert upkeep.revalidate_blueprints(repo) == {}
        tight = dataclasses.replace(BlueprintLimits(), max_layers=1)
        failed = upkeep.revalidate_blueprints(repo, tight)
    assert failed and all("layers" in why for why in failed.values()), failed


def test_warming_follows_the_newest_warm_list_when_there_is_one(settings: Settings):
    import io
    from datetime import date

    import pyarrow as pa
    import pyarrow.parquet as pq

    from esper_assets.analytics.rollups import WARM_LIST_SCHEMA, daily_key

    built = sorted(_registered_examples(settings).values())
    hot, cold = built[0], built[-1]
    with wiring.open_cache(settings) as cache:
        for _ in range(5):
            cache.get(hot)  # the cache's own counts say: hot
    store = wiring.object_store(settings)
    ranked = pa.table({"rank": [1], "kernel_id": [cold], "score": [9.0], "requests": [9],
                       "last_used": [date(2026, 11, 2)]}, schema=WARM_LIST_SCHEMA)  # fmt: skip
    for day, table in ((date(2026, 11, 1), ranked.slice(0, 0)), (date(2026, 11, 2), ranked)):
        sink = io.BytesIO()
        pq.write_table(table, sink)
        store.put(daily_key("warm_list", day), sink.getvalue())
    with wiring.open_cache(settings) as cache, wiring.open_repository(settings) as repo:
        assert list(upkeep.warm_most_used(cache, repo, n=1)) == [hot]  # no store: own counts
        assert list(upkeep.warm_most_used(cache, repo, n=1, store=store)) == [cold]
