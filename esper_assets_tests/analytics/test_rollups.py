"""The daily rollups on hand-written usage files with known answers, on a directory and
on S3 (moto's HTTP server); retirement and the inventory on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import math
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from esper_assets.analytics import rollups
from esper_assets.analytics.schema import BUCKETS, EVENT_SCHEMA, LATENCY_BOUNDS_US, events_key
from esper_assets.errors import InvalidInput
from esper_assets.storage import AssetMetadata
from esper_assets.storage.objects import DirectoryObjectStore, S3ObjectStore, make_s3_client

DAY = date(2026, 11, 5)


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    if request.param == "directory":
        return DirectoryObjectStore(tmp_path / "objects")
    client = make_s3_client(request.getfixturevalue("s3_endpoint"))
    return S3ObjectStore(client, request.getfixturevalue("s3_bucket"), "esper")


# -- writing usage files by hand ---------------------------------------------------------
def hist(**at_bound: int) -> list[int]:
    """A histogram with ``n`` requests in the bucket of each bound: hist(us_100=9)."""
    counts = [0] * BUCKETS
    for name, n in at_bound.items():
        counts[LATENCY_BOUNDS_US.index(int(name.removeprefix("us_")))] += n
    return counts


def row(kernel, tier, requests, latency=None, source="cache", op="get", size=100):
    latency = latency or [0] * BUCKETS
    return {"source": source, "id": kernel, "op": op, "tier": tier, "requests": requests,
            "bytes": requests * size, "latency_hist": latency, "latency_timed": sum(latency),
            "latency_us_sum": 0.0}  # fmt: skip


def write_file(store, day: date, hour: int, rows: list[dict], host="h1", seq=0) -> str:
    start = datetime(day.year, day.month, day.day, hour, tzinfo=UTC)
    full = [{"window_start": start, "window_s": 60.0, "host": host, "pid": 7, **r} for r in rows]
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(full, schema=EVENT_SCHEMA), sink, compression="zstd")
    key = events_key(start, host, 7, seq)
    store.put(key, sink.getvalue())
    return key


def a_day_of_use(store, day: date = DAY) -> None:
    """k-a: 6 l1 + 3 l3 + 1 miss reads (and a put that is no read); k-b: 100 timed l2
    reads over two files: 90 at <= 10 us, 8 at <= 100 us, 2 at <= 2000 us."""
    write_file(store, day, 1, [
        row("k-a", "l1", 6, hist(us_1=6)),
        row("k-a", "l3", 3, hist(us_200=2, us_1000=1)),
        row("k-a", "l3", 5, op="put"),
        row("k-b", "l2", 55, hist(us_10=50, us_100=4, us_2000=1)),
    ], seq=0)  # fmt: skip
    write_file(store, day, 9, [
        row("k-a", "miss", 1, hist(us_10000=1)),
        row("k-b", "l2", 45, hist(us_10=40, us_100=4, us_2000=1)),
        row("bp-1", "repository", 2, source="repository", op="read"),
    ], host="h2", seq=1)  # fmt: skip


def read_back(store, key: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(store.get(key)))


# -- compaction ---------------------------------------------------------------------------
def test_compact_day_writes_one_sorted_zstd_file(store):
    a_day_of_use(store)
    write_file(store, DAY + timedelta(days=1), 0, [row("k-z", "l1", 1)])  # another day

    done = rollups.compact_day(store, DAY)

    assert done.key == "usage/daily/events/date=2026-11-05/events.parquet"
    assert (done.rows, done.files, done.skipped) == (7, 2, [])
    assert done.bytes_in > 0 and done.bytes_out == len(store.get(done.key))
    written = read_back(store, done.key)
    assert written.schema.equals(EVENT_SCHEMA)
    order = written.select(["id", "tier", "window_start"]).to_pylist()
    order = [(r["id"], r["tier"], r["window_start"]) for r in order]
    assert order == sorted(order) and {i for i, _, _ in order} == {"bp-1", "k-a", "k-b"}
    meta = pq.ParquetFile(io.BytesIO(store.get(done.key))).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_an_empty_day_writes_an_empty_file_of_the_schema(store):
    done = rollups.compact_day(store, DAY)
    assert (done.rows, done.files, done.events, done.skipped) == (0, 0, 0, [])
    assert read_back(store, done.key).schema.equals(EVENT_SCHEMA)
    assert rollups.kernel_usage_daily(store, DAY).rows == 0


def test_a_corrupt_file_is_skipped_and_named(store):
    a_day_of_use(store)
    bad = events_key(datetime(2026, 11, 5, 3, tzinfo=UTC), "h3", 9, 0)
    store.put(bad, b"not parquet at all")

    done = rollups.compact_day(store, DAY)

    assert done.rows == 7 and done.files == 2
    assert [key for key, _ in done.skipped] == [bad]
    assert "Parquet" in done.skipped[0][1]


# -- kernel usage ---------------------------------------------------------------------------
def test_kernel_usage_counts_hit_rates_and_latency_quantiles(store):
    a_day_of_use(store)

    done = rollups.kernel_usage_daily(store, DAY)

    assert done.key == "usage/daily/kernel_usage/date=2026-11-05/kernel_usage.parquet"
    got = {(r["kernel_id"], r["tier"]): r for r in read_back(store, done.key).to_pylist()}
    assert sorted(got) == [("k-a", "l1"), ("k-a", "l3"), ("k-a", "miss"), ("k-b", "l2")]
    assert {t: got["k-a", t]["requests"] for t in ("l1", "l3", "miss")} == {
        "l1": 6,
        "l3": 3,
        "miss": 1,
    }
    assert {t: got["k-a", t]["hit_rate"] for t in ("l1", "l3", "miss")} == pytest.approx(
        {"l1": 0.6, "l3": 0.3, "miss": 0.1}
    )  # the put of k-a is not a read
    k_b = got["k-b", "l2"]
    assert (k_b["requests"], k_b["bytes"], k_b["hit_rate"]) == (100, 10_000, 1.0)
    # cumulative 90 (<= 10 us), 98 (<= 100 us), 100 (<= 2000 us)
    assert (k_b["p50_us"], k_b["p95_us"], k_b["p99_us"]) == (10, 100, 2000)
    assert (got["k-a", "l3"]["p50_us"], got["k-a", "l3"]["p99_us"]) == (200, 1000)


def test_a_latency_beyond_the_last_bound_is_infinite_and_untimed_is_null(store):
    overflow = [0] * (BUCKETS - 1) + [1]  # slower than the last bound
    write_file(store, DAY, 0, [row("k-slow", "l4", 1, overflow), row("k-l1", "l1", 3)])
    got = {r["kernel_id"]: r for r in rollups.kernel_usage_daily(store, DAY).table.to_pylist()}
    assert math.isinf(got["k-slow"]["p99_us"])
    assert got["k-l1"]["p99_us"] is None


# -- warm list ---------------------------------------------------------------------------
def test_the_warm_list_ranks_by_decayed_requests(store):
    write_file(store, DAY, 0, [row("k-new", "l1", 30)])
    write_file(store, DAY - timedelta(days=7), 0, [row("k-mid", "l2", 40)])  # 40 / 2
    write_file(store, DAY - timedelta(days=14), 0, [row("k-old", "miss", 100)])  # 100 / 4
    write_file(store, DAY - timedelta(days=40), 0, [row("k-gone", "l1", 10**6)])  # outside
    write_file(store, DAY + timedelta(days=1), 0, [row("k-later", "l1", 10**6)])  # after

    done = rollups.cache_warm_list(store, DAY, top_n=2, half_life_days=7, lookback_days=30)

    assert done.key == "usage/daily/warm_list/date=2026-11-05/warm_list.parquet"
    listed = read_back(store, done.key).to_pylist()
    assert [(r["rank"], r["kernel_id"]) for r in listed] == [(1, "k-new"), (2, "k-old")]
    assert [r["score"] for r in listed] == pytest.approx([30, 25])
    assert listed[1]["last_used"] == DAY - timedelta(days=14)
    everything = rollups.cache_warm_list(store, DAY, top_n=10)
    assert everything.table.column("kernel_id").to_pylist() == ["k-new", "k-old", "k-mid"]


def test_the_warm_list_sums_past_days_from_their_kernel_usage_files(store):
    write_file(store, DAY, 0, [row("k-today", "l1", 10)])
    past = DAY - timedelta(days=1)
    gone = write_file(store, past, 0, [row("k-past", "l1", 30), row("k-past", "miss", 2)])
    rolled = rollups.kernel_usage_daily(store, past)
    store.delete(gone)  # the day is now only in its rollup

    done = rollups.cache_warm_list(store, DAY, top_n=5, half_life_days=1, lookback_days=2)

    listed = {r["kernel_id"]: r for r in done.table.to_pylist()}
    assert listed["k-past"]["requests"] == 32 and listed["k-past"]["score"] == pytest.approx(16)
    assert listed["k-today"]["requests"] == 10 and listed["k-past"]["last_used"] == past
    assert done.events == 1 + rolled.events and done.day_files == 1  # DAY rolled in memory
    assert not store.get(rollups.daily_key("kernel_usage", DAY))  # and not written


def test_a_damaged_kernel_usage_file_is_named_and_its_day_rolled_up_again(store):
    past = DAY - timedelta(days=1)
    write_file(store, past, 0, [row("k-past", "l1", 3)])
    store.put(rollups.daily_key("kernel_usage", past), b"PAR1 torn")

    done = rollups.cache_warm_list(store, DAY, lookback_days=2)

    assert done.table.column("kernel_id").to_pylist() == ["k-past"]
    ((key, reason),) = done.skipped
    assert key == rollups.daily_key("kernel_usage", past) and "rolled up again" in reason


def test_each_rollup_file_says_what_it_was_made_from(store):
    a_day_of_use(store)
    store.put("usage/events/date=2026-11-05/hour=04/h9-1-000000.parquet", b"not parquet")
    done = rollups.kernel_usage_daily(store, DAY)
    said = rollups.Provenance.from_file(read_back(store, done.key))
    assert said is not None and (said.events, said.files, said.day_files) == (7, 2, 3)
    assert [key for key, _ in said.skipped] == [
        "usage/events/date=2026-11-05/hour=04/h9-1-000000.parquet"
    ]


@pytest.mark.parametrize(
    "arguments, named",
    [({"top_n": 0}, "top_n"), ({"half_life_days": -1}, "half_life_days"),
     ({"lookback_days": 1.5}, "lookback_days"), ({"half_life_days": math.nan}, "half_life_days")],
)  # fmt: skip
def test_bad_warm_list_arguments_are_named(tmp_path, arguments, named):
    with pytest.raises(InvalidInput, match=named):
        rollups.cache_warm_list(DirectoryObjectStore(tmp_path), DAY, **arguments)


def test_a_day_must_be_a_date(tmp_path):
    with pytest.raises(InvalidInput, match="day must be a datetime.date"):
        rollups.compact_day(DirectoryObjectStore(tmp_path), "2026-11-05")


# -- retirement and inventory ----------------------------------------------------------------
def register(repo, asset_type, asset_id, derived_from=(), **properties) -> str:
    meta = AssetMetadata(asset_type=asset_type, name=asset_id, asset_id=asset_id,
                         derived_from=list(derived_from), properties=properties)  # fmt: skip
    return repo.create_asset(meta, asset_id.encode() * 10)


def a_repository(repo) -> None:
    """Blueprints with their kernels; a live checkpoint naming k-saved (and, in its
    manifest only, k-listed); a deleted one naming k-dropped."""
    for name in ("used", "idle", "saved", "listed", "dropped", "read"):
        register(repo, "blueprint", f"bp-{name}")
    for name in ("used", "idle", "saved", "listed", "dropped"):
        register(repo, "kernel", f"k-{name}", [f"bp-{name}"])
    register(repo, "checkpoint", "run-1-step-1", ["k-saved"], kernels=["k-saved", "k-listed"])
    register(repo, "checkpoint", "run-1-step-0", ["k-dropped"], kernels=["k-dropped"])
    repo.update_asset("run-1-step-0", {"expires_at": datetime.now(UTC)})


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_retirement_spares_used_and_checkpointed_kernels_and_their_blueprints(make_repo, backend):
    repo, store = make_repo(backend), make_repo.store(backend)
    a_repository(repo)
    day = datetime.now(UTC).date() + timedelta(days=40)  # every asset older than the window
    write_file(store, day - timedelta(days=3), 0, [
        row("k-used", "l1", 1), row("bp-read", "repository", 1, source="repository"),
    ])  # fmt: skip
    write_file(store, day - timedelta(days=30), 0, [row("k-idle", "l1", 1)])  # before it

    seen = rollups.retirement_candidates(store, repo, day, unused_days=30)

    expected = ["k-dropped", "k-idle", "bp-dropped", "bp-idle"]
    assert seen.table.column("asset_id").to_pylist() == expected
    assert seen.table.column("deprecated").to_pylist() == [False] * 4
    assert {m.state for m in map(repo.get_metadata, expected)} == {"active"}

    done = rollups.retirement_candidates(store, repo, day, unused_days=30, apply=True)

    assert read_back(store, done.key).column("asset_id").to_pylist() == expected
    assert {m.state for m in map(repo.get_metadata, expected)} == {"deprecated"}
    last = repo.get_audit_log("k-idle")[-1]
    assert last["event"] == "deprecated" and "no use in the 30 days" in str(last["details"])
    assert repo.get_metadata("k-saved").state == repo.get_metadata("bp-used").state == "active"
    counts = {(r["asset_type"], r["state"]): r for r in
              rollups.asset_inventory(store, repo, day).table.to_pylist()}  # fmt: skip
    assert {k: r["assets"] for k, r in counts.items()} == {
        ("blueprint", "active"): 4, ("blueprint", "deprecated"): 2,
        ("checkpoint", "active"): 2, ("kernel", "active"): 3, ("kernel", "deprecated"): 2,
    }  # fmt: skip
    assert counts["checkpoint", "active"]["expired"] == 1
    assert counts["kernel", "deprecated"]["bytes"] == len(b"k-idle" * 10) + len(b"k-dropped" * 10)


def test_a_new_asset_is_not_retired_before_its_window_passed(make_repo):
    repo, store = make_repo("sqlite"), make_repo.store("sqlite")
    register(repo, "blueprint", "bp-new")
    today = datetime.now(UTC).date()
    assert rollups.retirement_candidates(store, repo, today, unused_days=30).rows == 0


def test_the_kernel_usage_sql_sums_every_histogram_bucket():
    from esper_assets.analytics.rollups import sql_text
    from esper_assets.analytics.schema import BUCKETS

    text = sql_text("kernel_usage")
    summed = [f"sum(latency_hist[{i}])" for i in range(1, BUCKETS + 1)]
    assert all(s in text for s in summed) and f"latency_hist[{BUCKETS + 1}]" not in text
