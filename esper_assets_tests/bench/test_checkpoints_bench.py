"""``esper bench checkpoints`` plumbing at a few MB on the embedded default: the
steps, the child processes, the JSON and the table. No timing is asserted."""

from __future__ import annotations

import json

import numpy as np

from esper_assets.bench import checkpoints as bench
from esper_assets.checkpoints.safetensors import header_length, parse_header

SCENARIOS = ["initial", "full_fp32", "frozen_80", "lora_1", "unchanged", "bf16"]
FIGURES = {
    "logical_bytes", "stored_bytes", "stored_fraction", "raw_copy_mb_s", "raw_copy_fsync_mb_s",
    "save_mb_s",
    "save_vs_raw", "save_vs_durable_copy", "restore_mb_s", "restore_vs_raw",
    "restore_vs_durable_copy", "restore_s_per_gb", "save_peak_rss_mb",
    "restore_peak_rss_mb", "child_baseline_rss_mb", "restored_size_ok", "targets", "ok",
}  # fmt: skip


def test_layout_changes_the_fractions_the_scenarios_name():
    layout = bench.model_layout(4 << 20)
    sizes = {n: 4 * int(np.prod(s)) for n, s in layout.items()}
    total = sum(sizes.values())
    assert total >= 4 << 20 and len({s for s in layout.values()}) > 4
    model = bench.random_tensors(layout, list(layout), 0)
    steps = dict(bench.scenarios(layout))

    def changed(after):
        return sum(sizes[n] for n in layout if not np.array_equal(model[n], after[n])) / total

    assert changed(steps["full_fp32"](model)) == 1
    assert 0.1 < changed(steps["frozen_80"](model)) < 0.3
    assert 0 < changed(steps["lora_1"](model)) < 0.03
    assert changed(steps["unchanged"](model)) == 0


def test_bf16_file_is_a_valid_safetensors_file_of_half_the_size(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float32)}
    size = bench.write_safetensors(tmp_path / "m.safetensors", tensors, bf16=True)
    data = (tmp_path / "m.safetensors").read_bytes()
    layout = parse_header(data, size, "test")
    assert [t.dtype for t in layout.tensors] == ["BF16", "BF16"]
    assert size - 8 - header_length(data[:8], size, "test") == 2 * 11
    # bf16 of 1.0 is 0x3F80: the upper half of the fp32 bits
    assert data[layout.tensors[1].start : layout.tensors[1].start + 2] == b"\x80\x3f"


def test_bench_runs_end_to_end_and_writes_its_json(tmp_path):
    from esper_assets.cli.bench import _render_checkpoints_bench
    from esper_assets.cli.render import write_and_emit

    result = bench.run(model_bytes=3 << 20, environ={})
    out = tmp_path / "checkpoints.json"
    write_and_emit(result, out, False, _render_checkpoints_bench)
    data = json.loads(out.read_text())
    assert data["bench"] == "checkpoints" and data["backend"] == "embedded"
    assert {"machine", "settings", "model", "raw_baseline", "save_async", "ok"} <= set(data)
    assert list(data["scenarios"]) == SCENARIOS
    for name, r in data["scenarios"].items():
        assert set(r) >= FIGURES, name
        assert r["restored_size_ok"] and r["save_peak_rss_mb"] > 0
        assert all(set(t) == {"target", "met"} for t in r["targets"].values())
    s = data["scenarios"]
    assert s["unchanged"]["stored_bytes"] == 0
    assert s["lora_1"]["stored_fraction"] < s["frozen_80"]["stored_fraction"] < 1
    assert s["bf16"]["logical_bytes"] < s["unchanged"]["logical_bytes"]
    assert "stored" in s["frozen_80"]["targets"] and "s/GB" in s["initial"]["targets"]
    assert {"overhead_pct", "ok", "target", "training_lost_s"} <= set(data["save_async"])
    assert len(data["save_async"]["rounds_overhead_pct"]) == 3
    assert "password" not in json.dumps(data["settings"])


def test_bench_on_postgres_and_s3_compares_with_boto3(pg_server_url, s3_endpoint, s3_bucket):
    environ = {"ESPER_DATABASE_URL": pg_server_url, "ESPER_S3_BUCKET": s3_bucket,
               "AWS_ENDPOINT_URL": s3_endpoint}  # fmt: skip
    result = bench.run(model_bytes=2 << 20, environ=environ)
    assert result["backend"] == "services"
    assert result["settings"]["l3_and_metadata"].startswith("postgresql")
    assert result["settings"]["object_store"].startswith("s3://")
    for name, r in result["scenarios"].items():
        assert r["restored_size_ok"], name
        assert r["raw_s3_upload_mb_s"] > 0 and r["save_vs_raw_s3"] > 0
        assert r["targets"]["save"]["target"] == ">= 0.5x boto3 upload/download"
        assert "s/GB" not in r["targets"]  # the embedded default's target only
    assert result["scenarios"]["unchanged"]["stored_bytes"] == 0
