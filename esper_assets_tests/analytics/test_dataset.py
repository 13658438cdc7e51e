"""Reading usage files back: the hive layout on a directory and on S3 (moto's HTTP
server), damaged files skipped and named, schema drift, an empty day, a dead store.

The helpers at the top (``event``, ``parquet_bytes``, ``put_events``) write files
the way the contract says; test_query and the CLI tests use them too."""

from __future__ import annotations

import io
from datetime import UTC, date, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esper_assets.analytics.dataset import READ_SCHEMA, event_keys, read_events, used_ids
from esper_assets.analytics.schema import BUCKETS, EVENT_SCHEMA, events_key
from esper_assets.errors import TierUnavailable
from esper_assets.storage.objects import DirectoryObjectStore, S3ObjectStore, make_s3_client
from esper_assets_tests.conftest import closed_port

MAY_1_13H = datetime(2024, 5, 1, 13, tzinfo=UTC)
MAY_1_14H = datetime(2024, 5, 1, 14, tzinfo=UTC)
MAY_2_09H = datetime(2024, 5, 2, 9, tzinfo=UTC)


def event(window: datetime, kernel: str, tier: str, requests: int, **changes) -> dict:
    """One row of a usage file: ``requests`` of ``kernel`` answered by ``tier``."""
    hist = [0] * BUCKETS
    hist[3] = requests
    row = dict(window_start=window, window_s=60.0, host="node1", pid=7, source="cache",
               id=kernel, op="get", tier=tier, requests=requests, bytes=100 * requests,
               latency_us_sum=8.0 * requests, latency_timed=requests, latency_hist=hist)  # fmt: skip
    return {**row, **changes}


def parquet_bytes(rows: list[dict], schema: pa.Schema | None = EVENT_SCHEMA) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out, compression="zstd")
    return out.getvalue()


def put_events(store, window: datetime, rows: list[dict], seq: int = 1, **schema) -> str:
    """Write ``rows`` as one flush's file at the layout; its key."""
    key = events_key(window, "node1", 7, seq)
    store.put(key, parquet_bytes(rows, **schema))
    return key


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    if request.param == "directory":
        return DirectoryObjectStore(tmp_path / "objects")
    endpoint = request.getfixturevalue("s3_endpoint")
    return S3ObjectStore(make_s3_client(endpoint), request.getfixturevalue("s3_bucket"), "esper")


def three_files(store) -> list[str]:
    return [
        put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5), event(MAY_1_13H, "k2", "l3", 2)]),
        put_events(store, MAY_1_14H, [event(MAY_1_14H, "k1", "l2", 3)]),
        put_events(store, MAY_2_09H, [event(MAY_2_09H, "k1", "l1", 11)]),
    ]  # fmt: skip


def test_reads_every_file_with_its_date_and_hour(store):
    keys = three_files(store)
    read = read_events(store)
    assert read.table.schema == READ_SCHEMA
    assert (read.files, read.skipped) == (3, [])
    assert read.bytes == sum(size for _, size in event_keys(store)) > 0
    rows = sorted(read.table.select(["date", "hour", "id", "tier", "requests"]).to_pylist(),
                  key=lambda r: (r["date"], r["hour"], r["id"]))  # fmt: skip
    assert rows == [
        {"date": "2024-05-01", "hour": 13, "id": "k1", "tier": "l1", "requests": 5},
        {"date": "2024-05-01", "hour": 13, "id": "k2", "tier": "l3", "requests": 2},
        {"date": "2024-05-01", "hour": 14, "id": "k1", "tier": "l2", "requests": 3},
        {"date": "2024-05-02", "hour": 9, "id": "k1", "tier": "l1", "requests": 11},
    ]
    assert [k for k, _ in event_keys(store)] == sorted(keys)


def test_one_day_reads_only_that_day(store):
    three_files(store)
    read = read_events(store, date(2024, 5, 2))
    assert read.files == 1
    assert read.table.column("requests").to_pylist() == [11]
    assert [k for k, _ in event_keys(store, date(2024, 5, 1))] == [
        events_key(MAY_1_13H, "node1", 7, 1),
        events_key(MAY_1_14H, "node1", 7, 1),
    ]


def test_an_empty_day_is_an_empty_table_with_the_schema(store):
    three_files(store)
    read = read_events(store, date(2024, 6, 1))
    assert (read.table.num_rows, read.files, read.bytes, read.skipped) == (0, 0, 0, [])
    assert read.table.schema == READ_SCHEMA


def test_corrupt_and_truncated_files_are_skipped_named_and_the_rest_read(store):
    good = put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5)])
    whole = parquet_bytes([event(MAY_1_13H, "k2", "l1", 1)])
    truncated = events_key(MAY_1_13H, "node1", 7, 2)
    store.put(truncated, whole[: len(whole) // 2])
    garbage = events_key(MAY_1_14H, "node1", 7, 3)
    store.put(garbage, b"not parquet at all")
    read = read_events(store)
    assert read.files == 1 and read.table.column("id").to_pylist() == ["k1"]
    assert read.bytes == dict(event_keys(store))[good]
    assert sorted(key for key, _ in read.skipped) == sorted([truncated, garbage])
    assert all("not a readable Parquet file" in reason for _, reason in read.skipped)


def test_an_extra_column_is_dropped_and_missing_measurements_are_zeros(tmp_path):
    store = DirectoryObjectStore(tmp_path)
    extra = EVENT_SCHEMA.append(pa.field("gpu", pa.string()))
    put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5, gpu="a100")], 1, schema=extra)
    missing = ("bytes", "latency_hist", "latency_timed")
    older = pa.schema([f for f in EVENT_SCHEMA if f.name not in missing])
    row = {k: v for k, v in event(MAY_1_13H, "k2", "l4", 2).items() if k not in missing}
    put_events(store, MAY_1_13H, [row], 2, schema=older)
    read = read_events(store)
    assert read.skipped == [] and read.table.schema == READ_SCHEMA
    by_id = {r["id"]: r for r in read.table.to_pylist()}
    assert by_id["k1"]["bytes"] == 500 and by_id["k1"]["latency_hist"][3] == 5
    assert (by_id["k2"]["requests"], by_id["k2"]["bytes"], by_id["k2"]["latency_timed"]) == (
        2,
        0,
        0,
    )
    assert by_id["k2"]["latency_hist"] == [0] * BUCKETS


def test_a_file_without_an_identity_column_or_off_the_layout_is_skipped(tmp_path):
    store = DirectoryObjectStore(tmp_path)
    no_id = pa.schema([f for f in EVENT_SCHEMA if f.name != "id"])
    row = {k: v for k, v in event(MAY_1_13H, "k1", "l1", 5).items() if k != "id"}
    nameless = put_events(store, MAY_1_13H, [row], schema=no_id)
    hourless = "usage/events/date=2024-05-01/node1-7-000003.parquet"
    store.put(hourless, parquet_bytes([event(MAY_1_13H, "k1", "l1", 1)]))
    reasons = dict(read_events(store).skipped)
    assert reasons[nameless] == "has no 'id' column"
    assert "hour=HH" in reasons[hourless]


def test_a_type_that_cannot_be_cast_is_named(tmp_path):
    bad = events_key(MAY_1_13H, "node1", 7, 1)
    table = pa.Table.from_pylist([event(MAY_1_13H, "k1", "l1", 1)], schema=EVENT_SCHEMA)
    table = table.set_column(3, "pid", pa.array(["seven"]))
    out = io.BytesIO()
    pq.write_table(table, out)
    store = DirectoryObjectStore(tmp_path)
    store.put(bad, out.getvalue())
    ((key, reason),) = read_events(store).skipped
    assert key == bad and reason.startswith("column 'pid' is string, not int32")


def test_an_unreachable_store_is_tier_unavailable():
    dead = S3ObjectStore(make_s3_client(f"http://127.0.0.1:{closed_port()}", 0.5), "bucket")
    with pytest.raises(
        TierUnavailable, match=r"cannot list usage/events/ in s3://bucket/.*AWS_ENDPOINT_URL"
    ):
        read_events(dead)


def test_a_histogram_of_the_wrong_length_is_named(tmp_path):
    store = DirectoryObjectStore(tmp_path)
    put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 1)], seq=1)
    short = put_events(store, MAY_1_13H, [event(MAY_1_13H, "k2", "l1", 1, latency_hist=[1])], seq=2)
    read = read_events(store)
    assert read.files == 1 and read.table.column("id").to_pylist() == ["k1"]
    assert read.skipped == [(short, f"has latency_hist rows that are not {BUCKETS} counts long")]


def test_used_ids_counts_the_rows_naming_each_id_and_skips_damaged_files(store):
    put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5), event(MAY_1_13H, "k1", "l2", 1),
                                  event(MAY_1_13H, "bp", "repository", 1)], seq=1)  # fmt: skip
    put_events(store, MAY_1_14H, [event(MAY_1_14H, "k1", "l1", 9)], seq=2)
    broken = put_events(store, MAY_1_14H, [event(MAY_1_14H, "k9", "l1", 1)], seq=3)
    store.put(broken, b"PAR1 torn")
    put_events(store, MAY_2_09H, [event(MAY_2_09H, "k-other-day", "l1", 1)])

    used = used_ids(store, MAY_1_13H.date())

    counts: dict[str, int] = {}
    for r in used.table.to_pylist():
        counts[r["id"]] = counts.get(r["id"], 0) + r["rows"]
    assert counts == {"k1": 3, "bp": 1}  # rows naming the id, not requests
    assert used.files == 2 and [key for key, _ in used.skipped] == [broken]
