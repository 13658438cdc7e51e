"""`esper analytics query|shell` on the embedded default (a temporary ESPER_HOME, its
objects directory holding usage files at the layout) and on moto's S3."""

from __future__ import annotations

import csv
import io
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from esper_assets.cli import main
from esper_assets.storage.objects import DirectoryObjectStore
from esper_assets_tests.analytics.test_dataset import MAY_1_13H, MAY_1_14H, event, put_events

TOTALS = "SELECT id, tier, sum(requests) AS requests FROM events GROUP BY ALL ORDER BY id"
EXPECTED = [{"id": "k1", "tier": "l1", "requests": 9}, {"id": "k2", "tier": "l3", "requests": 2}]


def write_usage(store) -> None:
    put_events(store, MAY_1_13H, [event(MAY_1_13H, "k1", "l1", 5), event(MAY_1_13H, "k2", "l3", 2)])
    put_events(store, MAY_1_14H, [event(MAY_1_14H, "k1", "l1", 4)])


@pytest.fixture
def home_store(esper_home) -> DirectoryObjectStore:
    """The object store the embedded default reads (ESPER_HOME/objects), with files."""
    store = DirectoryObjectStore(esper_home / "objects")
    write_usage(store)
    return store


def analytics(*args: str, **kwargs):
    return CliRunner().invoke(main, ["analytics", *args], **kwargs)


def test_query_prints_a_table(home_store):
    result = analytics("query", TOTALS)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "k1" in line or "k2" in line]
    assert len(lines) == 2 and "9" in lines[0] and "l3" in lines[1]
    assert "2 row(s)" in result.stdout


def test_query_as_json_and_csv(home_store):
    as_json = analytics("query", TOTALS, "--format", "json")
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.stdout) == EXPECTED
    as_csv = analytics("query", "SELECT id, tier, sum(requests) AS requests, list(host) AS hosts"
                       " FROM events GROUP BY ALL ORDER BY id", "--format", "csv")  # fmt: skip
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert rows[0] == {"id": "k1", "tier": "l1", "requests": "9", "hosts": '["node1", "node1"]'}
    assert len(rows) == 2


def test_query_to_a_parquet_file(home_store, tmp_path):
    out = tmp_path / "result" / "totals.parquet"
    result = analytics("query", TOTALS, "--format", "parquet", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).to_pylist() == EXPECTED
    assert "2 row(s) written to" in result.stdout


def test_parquet_without_out_is_a_usage_error(home_store):
    result = analytics("query", TOTALS, "--format", "parquet")
    assert result.exit_code == 2 and "--out" in result.output


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELEC 1", 'error: malformed query: Parser Error: syntax error at or near "SELEC"'),
        ("COPY events TO '/tmp/x.csv'", "error: analytics queries are read-only"),
        ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ],
)
def test_a_bad_query_exits_1_with_one_line(home_store, sql, message):
    result = analytics("query", sql)
    assert result.exit_code == 1
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_a_corrupt_file_is_named_on_stderr_and_the_rest_answered(home_store):
    broken = put_events(home_store, MAY_1_14H, [event(MAY_1_14H, "k9", "l1", 1)], seq=2)
    home_store.put(broken, b"garbage")
    result = analytics("query", TOTALS, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == EXPECTED
    assert f"skipped {broken}: not a readable Parquet file" in " ".join(result.stderr.split())


def test_query_reads_s3_when_a_bucket_is_configured(
    esper_home, s3_endpoint, s3_bucket, monkeypatch
):
    from esper_assets.settings import Settings
    from esper_assets.storage.objects import object_store_from_settings

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("ESPER_S3_BUCKET", s3_bucket)
    store = object_store_from_settings(Settings.from_env())  # the bucket under ESPER_S3_PREFIX
    assert store.location.startswith(f"s3://{s3_bucket}/")
    write_usage(store)
    result = analytics("query", TOTALS, "--format", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == EXPECTED


def test_the_shell_lists_views_answers_reports_errors_and_goes_on(home_store):
    lines = [".tables", "SELECT sum(requests) AS total FROM events;", "SELEC 1;",
             "DROP VIEW events;", ".bogus", "SELECT count(*) AS files FROM events;", ".quit",
             "SELECT 'never run' AS late;"]  # fmt: skip
    result = analytics("shell", input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for view in ("assets", "checkpoints", "events", "kernel_usage_daily"):
        assert f"\n{view}" in out or f"> {view}" in out
    assert "total" in out and "11" in out and "files" in out
    assert 'syntax error at or near "SELEC"' in result.stderr
    assert "DROP statements are refused" in result.stderr
    assert "unknown command '.bogus'" in result.stderr
    assert "never run" not in out


def test_the_shell_runs_what_is_typed_when_input_ends(home_store):
    result = analytics("shell", input="SELECT 40 + 2 AS answer\n")
    assert result.exit_code == 0, result.output
    assert "42" in result.stdout and result.stdout.count("esper> ") == 1


def test_a_statement_spans_lines_until_a_semicolon_or_an_empty_line(home_store):
    lines = ["SELECT sum(requests)", "  AS total", "FROM events;",
             "SELECT 6 * 7", "AS answer", "", ".quit"]  # fmt: skip
    result = analytics("shell", input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert "total" in result.stdout and "11" in result.stdout
    assert "answer" in result.stdout and "42" in result.stdout
    assert result.stdout.count("  ...> ") == 4 and not result.stderr
