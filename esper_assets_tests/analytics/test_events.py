"""UsageRecorder against real object stores: a directory and S3 on moto over HTTP."""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from esper_assets.analytics import schema
from esper_assets.analytics.events import UsageRecorder
from esper_assets.errors import InvalidInput
from esper_assets.storage.objects import DirectoryObjectStore, S3ObjectStore, make_s3_client
from esper_assets_tests.conftest import closed_port

HOUR = 3600.0  # no background flush during a test: each one flushes when it says so


def rows_of(store, prefix: str = schema.EVENTS_PREFIX) -> list[dict]:
    """Every row of every usage file in ``store``."""
    rows: list[dict] = []
    for key, _, _ in store.list(prefix):
        rows += pq.read_table(io.BytesIO(store.get(key))).to_pylist()
    return rows


def by_key(rows: list[dict]) -> dict[tuple, dict]:
    return {(r["source"], r["id"], r["op"], r["tier"]): r for r in rows}


@pytest.fixture
def directory(tmp_path) -> DirectoryObjectStore:
    return DirectoryObjectStore(tmp_path / "objects")


@pytest.fixture
def recorder(directory):
    with UsageRecorder(directory, host="test-host", flush_s=HOUR) as recorder:
        yield recorder


def test_rows_aggregate_requests_bytes_and_the_latency_histogram(recorder, directory):
    recorder.record("cache", "k1", "get", "l2", 100, 30.0)
    recorder.record("cache", "k1", "get", "l2", 50, 700.0)
    recorder.record("cache", "k1", "get", "l3", 10, None)  # untimed
    recorder.add_counts("cache", "get", "l1", {"k1": 5, "k2": 2})
    assert recorder.flush()
    rows = by_key(rows_of(directory))
    l2 = rows["cache", "k1", "get", "l2"]
    assert (l2["requests"], l2["bytes"], l2["latency_us_sum"], l2["latency_timed"]) == (
        2, 150, 730.0, 2,
    )  # fmt: skip
    expected = [0] * schema.BUCKETS
    expected[schema.bucket_of(30.0)] += 1
    expected[schema.bucket_of(700.0)] += 1
    assert l2["latency_hist"] == expected
    untimed = rows["cache", "k1", "get", "l3"]
    assert (untimed["requests"], untimed["latency_timed"], sum(untimed["latency_hist"])) == (
        1,
        0,
        0,
    )
    assert rows["cache", "k2", "get", "l1"]["requests"] == 2
    assert recorder.stats() == {"files": 1, "rows": 4, "dropped": 0, "failed_flushes": 0}


def test_reads_minus_lower_tier_requests_are_l1_hits(recorder, directory):
    recorder.add_reads("cache", "get", {"hot": 10, "cold": 2, "gone": 1})
    recorder.record("cache", "cold", "get", "l3", 8, 200.0)
    recorder.record("cache", "cold", "get", "l3", 8, 200.0)
    recorder.record("cache", "gone", "get", "miss", 0, 50.0)
    recorder.record("cache", "hot", "get", "l1", 0, 0.4, requests=0)  # an L1 latency sample
    recorder.flush()
    rows = by_key(rows_of(directory))
    hot = rows["cache", "hot", "get", "l1"]
    assert (hot["requests"], hot["latency_timed"]) == (10, 1)
    assert ("cache", "cold", "get", "l1") not in rows  # both reads went to L3
    assert ("cache", "gone", "get", "l1") not in rows
    assert rows["cache", "cold", "get", "l3"]["requests"] == 2


def test_the_file_lands_at_its_hive_key_and_reads_as_a_dataset(recorder, directory):
    recorder.record("repository", "asset-1", "read", "repository", 4096, 1500.0)
    before = datetime.now(UTC)
    recorder.flush()
    [(key, _, _)] = list(directory.list(schema.EVENTS_PREFIX))
    assert key.startswith(f"{schema.EVENTS_PREFIX}/date=")
    assert key.endswith(f"/test-host-{os.getpid()}-{key[-14:-8]}.parquet")
    file = pq.ParquetFile(io.BytesIO(directory.get(key)))
    assert file.schema_arrow.equals(schema.EVENT_SCHEMA)
    assert file.metadata.row_group(0).column(0).compression == "ZSTD"
    table = ds.dataset(directory.root / schema.EVENTS_PREFIX, partitioning="hive").to_table()
    [row] = table.to_pylist()
    assert (row["id"], row["bytes"], row["pid"]) == ("asset-1", 4096, os.getpid())
    start = row["window_start"]
    assert key == schema.events_key(start, "test-host", os.getpid(), int(key[-14:-8]))
    assert (row["date"], row["hour"]) in {
        (d.strftime("%Y-%m-%d"), int(d.strftime("%H"))) for d in (start, before)
    }


def test_an_empty_window_writes_no_file(recorder, directory):
    assert recorder.flush()
    assert list(directory.list(schema.EVENTS_PREFIX)) == []


def test_a_full_aggregation_drops_new_keys_and_counts_them(directory):
    with UsageRecorder(directory, flush_s=HOUR, max_keys=2) as recorder:
        recorder.record("cache", "a", "get", "l2", 1, 10.0)
        recorder.record("cache", "b", "get", "l2", 1, 10.0)
        recorder.record("cache", "c", "get", "l2", 1, 10.0)  # a third key: dropped
        recorder.add_counts("cache", "get", "l1", {"d": 3})  # 3 requests dropped
        recorder.record("cache", "a", "get", "l2", 1, 10.0)  # a known key still counts
        recorder.flush()
        assert recorder.stats()["dropped"] == 4
    rows = by_key(rows_of(directory))
    assert {k[1] for k in rows} == {"a", "b"}
    assert rows["cache", "a", "get", "l2"]["requests"] == 2


def test_record_many_is_one_untimed_record_per_read(tmp_path):
    reads = [("a", "l2", 10), ("b", "l3", 20), ("a", "l2", 5), ("c", "miss", 0), ("d", "l2", 1)]
    one_by_one, batched = (DirectoryObjectStore(tmp_path / name) for name in ("one", "many"))
    with UsageRecorder(one_by_one, flush_s=HOUR, max_keys=3) as recorder:
        for kernel_id, tier, nbytes in reads:
            recorder.record("cache", kernel_id, "get_many", tier, nbytes)
        recorder.flush()
        expected_stats = recorder.stats()
    with UsageRecorder(batched, flush_s=HOUR, max_keys=3) as recorder:
        recorder.record_many("cache", "get_many", reads)
        recorder.flush()
        assert recorder.stats() == expected_stats  # "d" dropped by both (max_keys)
    counted = ("requests", "bytes", "latency_timed", "latency_hist")

    def counts(store) -> dict:
        return {k: [row[c] for c in counted] for k, row in by_key(rows_of(store)).items()}

    assert counts(batched) == counts(one_by_one) != {}
    assert counts(batched)["cache", "a", "get_many", "l2"] == [2, 15, 0, [0] * schema.BUCKETS]


def test_a_failed_flush_keeps_the_rows_for_the_next_window(tmp_path):
    store = DirectoryObjectStore(tmp_path / "objects")
    with UsageRecorder(store, flush_s=HOUR, max_keys=2) as recorder:
        recorder.record("cache", "a", "get", "l2", 10, 10.0)
        recorder.record("cache", "b", "get", "l2", 10, 10.0)
        # A file where the usage folder belongs: the store cannot write (even as root).
        blocker = store.root / schema.EVENTS_PREFIX.split("/")[0]
        blocker.write_bytes(b"")
        assert recorder.flush() is False  # never raises
        recorder.record("cache", "a", "get", "l2", 10, 10.0)  # merges with the kept row
        recorder.record("cache", "c", "get", "l2", 10, 10.0)  # no room: dropped
        blocker.unlink()
        assert recorder.flush() is True
        assert recorder.stats() == {"files": 1, "rows": 2, "dropped": 1, "failed_flushes": 1}
    rows = by_key(rows_of(store))
    assert rows["cache", "a", "get", "l2"]["requests"] == 2
    assert rows["cache", "b", "get", "l2"]["bytes"] == 10


def test_an_unreachable_s3_keeps_then_drops_and_never_raises(tmp_path):
    store = S3ObjectStore(make_s3_client(f"http://127.0.0.1:{closed_port()}"), "nowhere")
    with UsageRecorder(store, flush_s=HOUR, max_keys=2) as recorder:
        recorder.record("cache", "a", "get", "l2", 10, 10.0)
        recorder.record("cache", "b", "get", "l2", 10, 10.0)
        assert recorder.flush() is False
        recorder.record("cache", "c", "get", "l2", 10, 10.0)  # the kept rows fill it
        assert recorder.flush() is False
    # close() tried once more, kept again, and said nothing
    assert recorder.stats() == {"files": 0, "rows": 0, "dropped": 1, "failed_flushes": 3}


def test_close_flushes_what_is_left(directory):
    recorder = UsageRecorder(directory, flush_s=HOUR)
    recorder.record("repository", "x", "read", "repository", 1, 1.0)
    recorder.close()
    assert [r["id"] for r in rows_of(directory)] == ["x"]
    recorder.close()  # twice is fine


def test_the_background_thread_flushes_every_flush_s(directory):
    from esper_assets_tests.conftest import wait_until

    with UsageRecorder(directory, flush_s=0.05) as recorder:
        recorder.record("cache", "k", "get", "l2", 1, 1.0)
        wait_until(lambda: recorder.stats()["files"] == 1, "a background flush")


def test_s3_store_holds_the_file_at_the_hive_key(s3_endpoint, s3_bucket):
    store = S3ObjectStore(make_s3_client(s3_endpoint), s3_bucket, "esper")
    with UsageRecorder(store, host="s3-host", flush_s=HOUR) as recorder:
        recorder.record("cache", "k", "get", "l4", 1 << 20, 9_000.0)
    [(key, _, _)] = list(store.list(schema.EVENTS_PREFIX))
    assert "/hour=" in key and f"s3-host-{os.getpid()}-" in key
    [row] = rows_of(store)
    assert (row["tier"], row["bytes"], row["latency_hist"][schema.bucket_of(9_000.0)]) == (
        "l4", 1 << 20, 1,
    )  # fmt: skip


@pytest.mark.parametrize("bad", [{"flush_s": 0}, {"max_keys": 0}, {"max_keys": 1.5}])
def test_bad_settings_are_refused(directory, bad):
    with pytest.raises(InvalidInput, match="UsageRecorder"):
        UsageRecorder(directory, **bad)


def test_a_repository_read_is_recorded_when_a_recorder_is_attached(make_repo, directory):
    with UsageRecorder(directory, flush_s=HOUR) as recorder:
        repo = make_repo("sqlite", usage=recorder)
        from esper_assets.storage.repository import AssetMetadata

        asset_id = repo.create_asset(AssetMetadata(asset_type="blueprint", name="b"), b"data")
        repo.get_asset(asset_id)
        repo.get_asset(asset_id)
        repo.get_asset(asset_id, record_access=False)  # bookkeeping: not usage
        recorder.flush()
    [row] = rows_of(directory)
    assert (row["source"], row["id"], row["op"], row["tier"]) == (
        "repository", asset_id, "read", "repository",
    )  # fmt: skip
    assert (row["requests"], row["bytes"], row["latency_timed"]) == (2, 8, 2)


@pytest.mark.parametrize("switch", ["on", "off"])
def test_wiring_records_repository_reads_unless_usage_is_off(esper_home, monkeypatch, switch):
    from esper_assets.flows import wiring
    from esper_assets.settings import Settings
    from esper_assets.storage.repository import AssetMetadata

    monkeypatch.setenv("ESPER_USAGE", switch)
    settings = Settings.from_env()
    with wiring.open_repository(settings) as repo:
        asset_id = repo.create_asset(AssetMetadata(asset_type="blueprint", name="b"), b"data")
        repo.get_asset(asset_id)
    rows = rows_of(wiring.object_store(settings))  # closing the repository flushed them
    assert [r["id"] for r in rows] == ([asset_id] if switch == "on" else [])


def test_wiring_records_cache_reads_on_the_repositorys_store(esper_home):
    from esper_assets.flows import wiring
    from esper_assets.settings import Settings

    settings = Settings.from_env()
    with wiring.open_cache(settings) as cache:
        cache.put("k", b"x")
        cache.get("k")
        cache.get("k")
    rows = by_key(rows_of(wiring.object_store(settings)))
    assert rows["cache", "k", "get", "l1"]["requests"] == 2


@pytest.mark.parametrize(
    "env", [{"ESPER_USAGE": "maybe"}, {"ESPER_USAGE_FLUSH_S": "0"}, {"ESPER_USAGE_FLUSH_S": "soon"}]
)
def test_bad_usage_settings_name_the_variable(env):
    from esper_assets.errors import ConfigError
    from esper_assets.settings import Settings

    with pytest.raises(ConfigError, match=next(iter(env))):
        Settings.from_env(env)


def test_usage_settings_default_on_every_minute():
    from esper_assets.settings import Settings

    assert (Settings.from_env({}).usage, Settings.from_env({}).usage_flush_s) == (True, 60.0)
    off = Settings.from_env({"ESPER_USAGE": "OFF", "ESPER_USAGE_FLUSH_S": "2.5"})
    assert (off.usage, off.usage_flush_s) == (False, 2.5)
