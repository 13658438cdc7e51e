"""AnalyticsSession: the views over real files (a directory, moto's S3) and a real
repository (SQLite, PostgreSQL), and what it refuses: every statement but one SELECT,
and files, ATTACH and INSTALL even from inside a SELECT (DuckDB's own lock)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from esper_assets.analytics import rollups
from esper_assets.analytics.query import KERNEL_USAGE_DAILY_SCHEMA, AnalyticsSession
from esper_assets.errors import InvalidQuery
from esper_assets.storage.objects import DirectoryObjectStore
from esper_assets.storage.repository.records import AssetMetadata
from esper_assets_tests.analytics.test_dataset import (
    MAY_1_13H,
    MAY_1_14H,
    event,
    parquet_bytes,
    put_events,
    store,  # noqa: F401  (the directory / S3 fixture)
)

TIER_TOTALS = "SELECT tier, sum(requests) AS requests FROM events GROUP BY tier ORDER BY tier"


@pytest.fixture
def local(tmp_path) -> DirectoryObjectStore:
    return DirectoryObjectStore(tmp_path / "objects")


def test_events_view_over_the_layout(store):  # noqa: F811
    put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5), event(MAY_1_13H, "k2", "l3", 2)])
    put_events(store, MAY_1_14H, [event(MAY_1_14H, "k1", "l1", 4)])
    with AnalyticsSession(store) as session:
        assert session.query(TIER_TOTALS).to_pylist() == [
            {"tier": "l1", "requests": 9},
            {"tier": "l3", "requests": 2},
        ]
        hours = session.query("SELECT DISTINCT date, hour FROM events ORDER BY hour")
        assert hours.to_pylist() == [{"date": "2024-05-01", "hour": h} for h in (13, 14)]
        assert session.skipped == []


def test_a_corrupt_file_is_skipped_named_and_the_rest_queried(local):
    put_events(local, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5)])
    broken = put_events(local, MAY_1_14H, [event(MAY_1_14H, "k1", "l1", 4)])
    local.put(broken, b"PAR1 and then nothing")
    with AnalyticsSession(local) as session:
        assert session.query("SELECT sum(requests) AS n FROM events").to_pylist() == [{"n": 5}]
        assert [key for key, _ in session.skipped] == [broken]


def test_a_view_is_read_when_a_query_first_names_it(local):
    broken = put_events(local, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5)])
    local.put(broken, b"not parquet")
    with AnalyticsSession(local) as session:
        assert session.views() == ["assets", "checkpoints", "events", "kernel_usage_daily"]
        assert session.query("SELECT count(*) AS n FROM assets").to_pylist() == [{"n": 0}]
        assert session.skipped == []  # no usage file was read for that
        session.query("SELECT count(*) FROM Events")  # names are case-insensitive
        assert [key for key, _ in session.skipped] == [broken]


def test_a_compacted_day_is_read_from_its_one_file(store):  # noqa: F811
    first = put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5)], seq=1)
    second = put_events(store, MAY_1_14H, [event(MAY_1_14H, "k2", "l2", 4)], seq=2)
    rollups.compact_day(store, MAY_1_13H.date())
    store.delete(first)
    store.delete(second)  # the day is now only in its compacted file
    with AnalyticsSession(store) as session:
        assert session.query(TIER_TOTALS).to_pylist() == [
            {"tier": "l1", "requests": 5}, {"tier": "l2", "requests": 4},
        ]  # fmt: skip
        hours = session.query("SELECT id, date, hour FROM events ORDER BY id").to_pylist()
    assert hours == [{"id": "k1", "date": "2024-05-01", "hour": 13},
                     {"id": "k2", "date": "2024-05-01", "hour": 14}]  # fmt: skip


def test_a_day_with_files_newer_than_its_compaction_is_read_from_its_files(store):  # noqa: F811
    put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5)], seq=1)
    compacted = rollups.compact_day(store, MAY_1_13H.date())
    put_events(store, MAY_1_14H, [event(MAY_1_14H, "k1", "l1", 4)], seq=2)  # landed after
    with AnalyticsSession(store) as session:
        assert session.query("SELECT sum(requests) AS n FROM events").to_pylist() == [{"n": 9}]
    store.put(compacted.key, b"PAR1 torn")  # a damaged compacted file: the files again
    with AnalyticsSession(store) as session:
        assert session.query("SELECT sum(requests) AS n FROM events").to_pylist() == [{"n": 9}]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_assets_and_checkpoints_views_read_the_repository(make_repo, backend):
    repo = make_repo(backend)
    kernel = repo.create_asset(AssetMetadata("kernel", "conv", tags={"gpu", "fp16"}), b"k" * 10)
    ckpt = AssetMetadata("checkpoint", "run-a", version="3", properties={"run": "run-a", "step": 3})
    checkpoint = repo.create_asset(ckpt, b"manifest")
    with AnalyticsSession(make_repo.store(backend), repo) as session:
        assets = session.query(
            "SELECT asset_id, asset_type, size, tags FROM assets ORDER BY asset_type"
        )
        assert assets.to_pylist() == [
            {"asset_id": checkpoint, "asset_type": "checkpoint", "size": 8, "tags": []},
            {"asset_id": kernel, "asset_type": "kernel", "size": 10, "tags": ["fp16", "gpu"]},
        ]
        rows = session.query("SELECT asset_id, run, step, state FROM checkpoints").to_pylist()
        assert rows == [{"asset_id": checkpoint, "run": "run-a", "step": 3, "state": "active"}]


def test_views_without_a_repository_or_rollups_are_empty_with_their_columns(local):
    with AnalyticsSession(local) as session:
        assert session.views() == ["assets", "checkpoints", "events", "kernel_usage_daily"]
        for view in ("assets", "checkpoints", "events", "kernel_usage_daily"):
            assert session.query(f"SELECT count(*) AS n FROM {view}").to_pylist() == [{"n": 0}]
        daily = session.query("SELECT * FROM kernel_usage_daily")
        assert daily.schema.names == KERNEL_USAGE_DAILY_SCHEMA.names


def test_kernel_usage_daily_reads_the_rollup_files_with_their_day(local):
    row = {"kernel_id": "k1", "tier": "l1", "requests": 9, "hit_rate": 1.0, "bytes": 900,
           "p50_us": 8.0, "p95_us": 9.0, "p99_us": 9.5}  # fmt: skip
    schema = pa.schema([f for f in KERNEL_USAGE_DAILY_SCHEMA if f.name != "day"])
    local.put(
        "usage/daily/kernel_usage/date=2024-05-01/part-0.parquet", parquet_bytes([row], schema)
    )
    with AnalyticsSession(local) as session:
        daily = session.query(
            "SELECT CAST(day AS VARCHAR) AS day, kernel_id, requests FROM kernel_usage_daily"
        )
        assert daily.to_pylist() == [{"day": "2024-05-01", "kernel_id": "k1", "requests": 9}]


def test_register_adds_a_view_and_refuses_a_name_that_is_not_an_identifier(local):
    with AnalyticsSession(local) as session:
        session.register("hourly", pa.table({"hour": [13, 14], "requests": [5, 4]}))
        assert session.query("SELECT sum(requests) AS n FROM hourly").to_pylist() == [{"n": 9}]
        with pytest.raises(InvalidQuery, match="not an identifier"):
            session.register("x; DROP TABLE events", pa.table({"a": [1]}))


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM events) TO '{tmp}/out.csv'",
        "ATTACH '{tmp}/other.duckdb' AS other",
        "INSTALL httpfs",
        "LOAD httpfs",
        "CREATE TABLE stolen AS SELECT * FROM events",
        "SET enable_external_access = true",
        "SELECT * FROM events; DROP VIEW events",
        "EXPLAIN ANALYZE CREATE TABLE t (a INTEGER)",
        "SELECT * FROM read_parquet('/etc/*.parquet')",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_csv('{tmp}/out.csv')",
    ],
)
def test_anything_but_one_select_over_the_views_is_refused(local, tmp_path, sql):
    (tmp_path / "out.csv").write_text("a\n1\n")  # a file a query would read if it could
    with AnalyticsSession(local) as session:
        with pytest.raises(InvalidQuery, match="read-only") as refused:
            session.query(sql.format(tmp=tmp_path))
        assert "\n" not in str(refused.value)
        assert session.views() == ["assets", "checkpoints", "events", "kernel_usage_daily"]
    assert not (tmp_path / "other.duckdb").exists()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELEC 1", 'malformed query: Parser Error: syntax error at or near "SELEC"'),
        (
            "SELECT * FROM nowhere",
            "query failed: Catalog Error: Table with name nowhere does not exist!",
        ),
        (
            "SELECT nope FROM events",
            'query failed: Binder Error: Referenced column "nope" not found',
        ),
        ("", "the query is empty"),
    ],
)
def test_a_bad_query_is_invalid_query_with_duckdbs_message_on_one_line(local, sql, message):
    with AnalyticsSession(local) as session, pytest.raises(InvalidQuery) as bad:
        session.query(sql)
    assert str(bad.value).startswith(message) and "\n" not in str(bad.value)
