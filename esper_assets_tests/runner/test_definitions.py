"""The Definitions the runner, the CLI and the bench build (``build_definitions``):
they load, a maintenance job runs, and the code location's S3 clients are bounded."""

from __future__ import annotations

import dagster as dg

from esper_assets.defs import build_definitions


def test_dagster_definitions_load_and_maintenance_job_runs(esper_home):
    defs = build_definitions()

    dg.Definitions.validate_loadable(defs)
    job = defs.get_job_def("cache_maintenance_job")
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    removed = result.output_for_node("clean_kernel_cache")
    assert set(removed) == {"l1", "l3", "l4"}


def test_dagster_s3_clients_are_bounded_like_the_librarys(esper_home, monkeypatch):
    """The code location's S3 client (L4 and the landing zone in Dagster runs) makes one
    attempt with the library's timeouts, not dagster-aws's 60 s and retries."""
    monkeypatch.setenv("ESPER_S3_BUCKET", "esper-bounded")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    resources = build_definitions().resources
    wanted = {key: resources[key] for key in ("object_store", "landing")}
    with dg.build_resources(wanted) as built:  # resolves the EnvVars, as a run does
        for resource in (built.object_store.s3, built.landing.s3):
            config = resource.get_client().meta.config
            assert (config.connect_timeout, config.read_timeout) == (2.0, 2.0)
            assert config.retries["total_max_attempts"] == 1
