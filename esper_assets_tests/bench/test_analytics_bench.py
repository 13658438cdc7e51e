"""``esper bench analytics`` plumbing at a few thousand rows: the synthetic rows
follow the contract, the bench runs end to end and writes its JSON. No timing is
asserted."""

from __future__ import annotations

import json
from datetime import date

import pyarrow.dataset as ds

from esper_assets.analytics import schema
from esper_assets.bench import analytics as bench
from esper_assets.storage.objects import DirectoryObjectStore


def test_synthetic_rows_follow_the_contract(tmp_path):
    store = DirectoryObjectStore(tmp_path, durable=False)
    bench.write_day(store, date(2026, 11, 1), 1_200, seed=3)
    table = ds.dataset(tmp_path / schema.EVENTS_PREFIX, partitioning="hive").to_table()
    assert table.num_rows == 1_200
    assert table.select(schema.EVENT_SCHEMA.names).schema.equals(schema.EVENT_SCHEMA)
    assert set(table.column("date").to_pylist()) == {"2026-11-01"}
    hist_sums = [sum(h) for h in table.column("latency_hist").to_pylist()]
    assert hist_sums == table.column("latency_timed").to_pylist()


def test_bench_runs_end_to_end_and_writes_its_json(tmp_path):
    from esper_assets.cli.bench import _render_analytics_bench
    from esper_assets.cli.render import write_and_emit

    result = bench.run(rows=5_000)
    out = tmp_path / "analytics.json"
    write_and_emit(result, out, False, _render_analytics_bench)
    data = json.loads(out.read_text())
    assert data["bench"] == "analytics" and data["rows"] == 5_000
    assert data["compaction"]["mb_s"] > 0 and data["rollup"]["raw_duckdb_seconds"] > 0
    assert {"ok", "target", "seconds"} <= set(data["rollup"])
    assert {"ok", "target", "ms"} <= set(data["top_100_30_days"])
    assert data["retirement_30_days"]["seconds"] > 0
    l1 = data["l1_hit_recording"]
    assert l1["recorded_us"] > 0 and l1["unrecorded_us"] > 0 and {"ok", "target"} <= set(l1)
