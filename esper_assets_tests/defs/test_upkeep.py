"""The upkeep domain: the nightly re-validation is the asset check
``registered_blueprints_still_valid`` on ``compiled_kernels``, run by
``revalidate_blueprints_job`` on the ``nightly_blueprint_revalidation`` schedule, its
outcome recorded on the asset with what was checked and what failed; the upkeep
schedules run by default. On the embedded default: blueprints are registered in the
SQLite repository through the flows, runs go through a real (temporary) Dagster
instance."""

from __future__ import annotations

import json

import dagster as dg
import pytest

from esper_assets.blueprints import BlueprintLimits
from esper_assets.defs import build_definitions
from esper_assets.defs.resources import BlueprintRulesResource
from esper_assets.defs.upkeep.checks import LISTED, REVALIDATION, revalidation_result
from esper_assets.flows import kernels, upkeep, wiring
from esper_assets.settings import Settings
from esper_assets_tests.conftest import free_port

KERNELS = dg.AssetKey("compiled_kernels")


@pytest.fixture
def instance(esper_home):
    with dg.instance_for_test() as instance:
        yield instance


def mlp(name: str, width: int) -> bytes:
    layers = [{"op": "linear", "out_features": width}, {"op": "relu"}]
    doc = {"name": name, "version": "1.0.0", "input_shape": [4], "layers": layers}
    return json.dumps(doc).encode()


def register(**widths: int) -> None:
    """Register one blueprint per name (an MLP of that width) in ESPER_HOME's repository."""
    settings = Settings.from_env()
    landing = wiring.landing_zone(settings)
    for name, width in widths.items():
        landing.put(f"{name}.json", mlp(name, width))
    with wiring.open_repository(settings) as repo:
        ingested = kernels.ingest_blueprints(repo, landing, sorted(kernels.landed_files(landing)))
    assert [r.valid for r in ingested] == [True] * len(widths)


def evaluations(instance: dg.DagsterInstance, run_id: str) -> list:
    return [
        record.get_dagster_event().event_specific_data
        for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    ]


def metadata(evaluation) -> dict:
    return {k: v.value for k, v in evaluation.metadata.items()}


def test_revalidation_is_a_check_on_compiled_kernels_naming_what_failed(instance):
    register(base=8, big=64)  # base: 4*8+8 = 40 parameters; big: 4*64+64 = 320
    job = build_definitions().resolve_job_def("revalidate_blueprints_job")
    ok = job.execute_in_process(instance=instance)
    assert ok.success
    [passed] = evaluations(instance, ok.run_id)
    assert (passed.asset_key, passed.check_name, passed.passed) == (KERNELS, REVALIDATION, True)
    seen = metadata(passed)
    assert (seen["blueprint_versions_checked"], seen["blueprint_versions_failed"]) == (2, 0)
    assert "<= 20,000,000 parameters" in seen["rules"] and "parent" in seen["steps"]
    assert "failures" not in seen and passed.description.startswith("All 2 registered")

    # Today's rules are tighter: big no longer passes. The run still succeeds (a check
    # that fails is the asset's state, not the run's); the asset carries the failure.
    strict = build_definitions(blueprint_rules=BlueprintRulesResource(max_parameters=100))
    late = strict.resolve_job_def("revalidate_blueprints_job").execute_in_process(instance=instance)
    assert late.success
    [failed] = evaluations(instance, late.run_id)
    assert (failed.asset_key, failed.passed) == (KERNELS, False)
    assert failed.severity == dg.AssetCheckSeverity.ERROR
    seen = metadata(failed)
    assert (seen["blueprint_versions_checked"], seen["blueprint_versions_failed"]) == (2, 1)
    assert seen["failed_versions"] == "big@1.0.0"
    assert "| `big@1.0.0` | " in seen["failures"] and "base@1.0.0" not in seen["failures"]
    assert "320 parameters; the limit is 100" in seen["failures"]
    assert "<= 100 parameters" in seen["rules"]
    assert failed.description.startswith("1 of 2 registered blueprint versions no longer pass")

    # The check's latest execution on the asset (what the asset's Checks tab shows): the
    # failed one, and neither run materialized anything.
    record = instance.get_latest_asset_check_evaluation_record(
        dg.AssetCheckKey(KERNELS, REVALIDATION)
    )
    assert record is not None and record.run_id == late.run_id
    assert record.evaluation is not None and not record.evaluation.passed
    assert not instance.fetch_materializations(KERNELS, limit=1).records


def test_the_failure_table_is_bounded_and_reads_as_a_table():
    failed = {f"bp{i:03}@1.0.0": f"a | b\nreason {i}" for i in range(LISTED + 7)}
    found = upkeep.Revalidation(checked=[*failed, "ok@1.0.0"], failed=failed)
    result = revalidation_result(found, BlueprintLimits())
    assert not result.passed
    table = result.metadata["failures"].value
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) == LISTED and rows[0] == "| `bp000@1.0.0` | a \\| b reason 0 |"
    assert table.endswith("... and 7 more (the run's log names every one)")
    assert result.metadata["blueprint_versions_failed"].value == LISTED + 7
    assert len(result.description) <= 4000


def test_the_nightly_schedule_runs_the_check_and_upkeep_runs_by_default(esper_home):
    defs = build_definitions()
    nightly = defs.resolve_schedule_def("nightly_blueprint_revalidation")
    assert nightly.job_name == "revalidate_blueprints_job"
    upkeep_schedules = {
        "hourly_cache_maintenance": dg.DefaultScheduleStatus.RUNNING,
        "warm_cache_every_15_minutes": dg.DefaultScheduleStatus.RUNNING,
        "nightly_blueprint_revalidation": dg.DefaultScheduleStatus.RUNNING,
        "cache_health_every_15_minutes": dg.DefaultScheduleStatus.RUNNING,
    }
    for name, status in upkeep_schedules.items():
        schedule = defs.resolve_schedule_def(name)
        assert schedule.default_status == status, name
        assert "by default" in (schedule.description or ""), name  # and says why
    # Deleting checkpoints stays a decision someone makes.
    retention = defs.resolve_schedule_def("daily_checkpoint_retention")
    assert retention.default_status == dg.DefaultScheduleStatus.STOPPED


# -- kernel_cache_healthy ---------------------------------------------------------------------
def test_the_cache_health_check_passes_on_the_embedded_cache(instance):
    job = build_definitions().resolve_job_def("cache_health_job")
    result = job.execute_in_process(instance=instance)
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "kernel_cache_healthy" and evaluation.passed
    assert evaluation.asset_key == dg.AssetKey("compiled_kernels")
    tiers = evaluation.metadata["tiers"].value
    assert "| l1 | healthy |" in tiers and "| l3 | healthy |" in tiers
    assert evaluation.metadata["unhealthy_tiers"].value == "none"


def test_the_cache_health_check_names_a_dead_tier(instance, monkeypatch):
    """Redis unreachable (nothing listens on the port): L2 fails and the check fails as
    a warning (the kernels are still served from L3), naming the tier."""
    monkeypatch.setenv("ESPER_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    job = build_definitions().resolve_job_def("cache_health_job")
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["unhealthy_tiers"].value == "l2"
    assert evaluation.description.startswith("l2: ")
