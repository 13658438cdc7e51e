"""``esper health``: a ping and a write-read-delete probe per cache tier, on PostgreSQL +
Redis, and with Redis unreachable (exit 1, the failing tier named, the others healthy)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from esper_assets.cli import main
from esper_assets_tests.conftest import free_port


def test_health_probes_every_tier(esper_home, monkeypatch, pg_url, redis_server_url):
    monkeypatch.setenv("ESPER_DATABASE_URL", pg_url)
    monkeypatch.setenv("ESPER_REDIS_URL", redis_server_url)
    result = CliRunner().invoke(main, ["health", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"l1", "l2", "l3"} <= set(report)
    for level in ("l2", "l3"):
        tier = report[level]
        assert tier["status"] == "healthy" and tier["breaker"] == "closed", tier
        assert tier["probe"]["written"] and tier["probe"]["read"] and tier["probe"]["deleted"]
        assert {"read_ms", "write_ms", "delete_ms"} <= set(tier["probe"])
        assert tier["latency_ms"] >= 0


def test_health_names_an_unreachable_tier_and_exits_1(esper_home, monkeypatch):
    monkeypatch.setenv("ESPER_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nobody there
    result = CliRunner().invoke(main, ["health", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["l2"]["status"] != "healthy"
    assert report["l3"]["status"] == "healthy" and report["l3"]["probe"]["deleted"]
