"""``esper bench repository``: AssetRepository against the raw client, same run.

On PostgreSQL (when ESPER_DATABASE_URL is set) and on the embedded SQLite file:
bulk_create throughput vs a raw bulk write of the very same rows (binary COPY
on PostgreSQL, ``executemany`` on SQLite), then create / search / lineage
latencies on the resulting table.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from tempfile import TemporaryDirectory
from typing import Any

from esper_assets.bench.scratch import postgres_schema
from esper_assets.bench.timing import wall_ms
from esper_assets.flows.wiring import object_store, open_repository
from esper_assets.settings import Settings
from esper_assets.storage import AssetMetadata, AssetQuery, AssetRepository
from esper_assets.storage.repository import ASSET_COLUMNS

CHAIN = 10  # every 10 assets form one parent chain, so depth-5 lineage has work to do


def synthetic_assets(n: int, seed: str) -> list[tuple[AssetMetadata, bytes]]:
    """Small kernels in chains of CHAIN, with tags and properties to search on."""
    items = []
    for i in range(n):
        asset_id = f"{seed}-{i:07d}"
        parent = f"{seed}-{i - 1:07d}" if i % CHAIN else None
        meta = AssetMetadata(
            asset_type="kernel",
            name=f"kernel-{i // CHAIN:06d}",
            asset_id=asset_id,
            parent_id=parent,
            tags={f"family-{i % 50}", "bench"},
            properties={"target": f"cpu{i % 100}", "layers": i % 7},
            compilation_time_ms=float(i % 1000),
        )
        items.append((meta, f"{seed}:{i}".encode() * 4))
    return items


def _raw_rows(items: list[tuple[AssetMetadata, bytes]], repo: AssetRepository) -> list[tuple]:
    """The rows bulk_create writes, built the way a hand-written loader would."""
    import hashlib

    db = repo.backend
    now = db.now()
    versions: dict[str, tuple[int, str | None]] = {}
    rows = []
    for meta, data in items:
        number, previous = versions.get(meta.name, (0, None))
        number += 1
        versions[meta.name] = (number, meta.asset_id)
        values = {
            "asset_id": meta.asset_id, "asset_type": meta.asset_type, "name": meta.name,
            "version": f"v{number}", "version_number": number, "previous_version_id": previous,
            "created_at": now, "created_by": "bench", "parent_id": meta.parent_id,
            "derived_from": db.encode_list([]), "tags": db.encode_list(sorted(meta.tags)),
            "properties": db.encode_json(meta.properties),
            "compilation_time_ms": meta.compilation_time_ms, "size_bytes": len(data),
            "checksum": hashlib.sha256(data).hexdigest(), "data": data, "object_key": None,
            "last_accessed": None, "access_count": 0, "state": "active", "expires_at": None,
            "created_event": 1,  # bulk_create's rows point at their batch's audit event
        }  # fmt: skip
        rows.append(tuple(values[c] for c in ASSET_COLUMNS))
    return rows


def _raw_bulk(repo: AssetRepository, rows: list[tuple], foreign_keys: bool = True) -> float:
    """Seconds for the raw client to write ``rows`` into a twin of the assets table:
    same columns, checks, unique constraints and indexes (GIN included) and, unless
    ``foreign_keys`` is False, the same foreign keys (pointing into the twin), since
    the real table makes every writer pay for them."""
    db = repo.backend
    with db.transaction() as conn:
        if db.dialect == "postgres":
            conn.execute("CREATE TABLE raw_assets (LIKE assets INCLUDING ALL)")
            if foreign_keys:
                for (definition,) in conn.execute(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                    " WHERE conrelid = 'assets'::regclass AND contype = 'f'"
                ).fetchall():
                    target = definition.replace("REFERENCES assets(", "REFERENCES raw_assets(")
                    conn.execute(f"ALTER TABLE raw_assets ADD {target}")
            start = time.perf_counter()
            db.copy_rows(conn, "raw_assets", rows)
        else:
            for (ddl,) in conn.execute(
                "SELECT sql FROM sqlite_master WHERE tbl_name = 'assets' AND sql IS NOT NULL"
                " ORDER BY type = 'index'"  # the table before its indexes
            ).fetchall():
                conn.execute(_twin(ddl, foreign_keys))
            start = time.perf_counter()
            marks = ",".join("?" * len(ASSET_COLUMNS))
            conn.executemany(
                f"INSERT INTO raw_assets ({', '.join(ASSET_COLUMNS)}) VALUES ({marks})", rows
            )
    seconds = time.perf_counter() - start  # includes the commit
    with db.transaction() as conn:
        conn.execute("DROP TABLE raw_assets")
    return seconds


def _twin(ddl: str, foreign_keys: bool) -> str:
    """The same CREATE statement for raw_assets (and its indexes)."""
    references = " REFERENCES raw_assets (asset_id)" if foreign_keys else ""
    ddl = ddl.replace(" REFERENCES assets (asset_id)", references)
    ddl = ddl.replace("CREATE TABLE assets", "CREATE TABLE raw_assets")
    ddl = ddl.replace(" ON assets ", " ON raw_assets ").replace(
        "INDEX assets_", "INDEX raw_assets_"
    )
    return ddl


@contextmanager
def _repositories(settings: Settings) -> Iterator[list[tuple[str, AssetRepository]]]:
    """Empty repositories built by the wiring: on the embedded SQLite file of a
    temporary home, and (first) in a scratch schema of ``settings``' PostgreSQL;
    both keep their large objects in one directory of that home."""
    with TemporaryDirectory(prefix="esper-bench-repo-") as tmp, ExitStack() as stack:
        embedded = Settings.from_env({"ESPER_HOME": tmp})
        store = object_store(embedded)
        repos = [("sqlite", stack.enter_context(open_repository(embedded, store)))]
        if settings.database_url:
            url = stack.enter_context(postgres_schema(settings.database_url))
            scratch = Settings.from_env({"ESPER_HOME": tmp, "ESPER_DATABASE_URL": url})
            repos.insert(0, ("postgres", stack.enter_context(open_repository(scratch, store))))
        yield repos


def bench_backend(
    repo: AssetRepository, n: int, repeats: int, progress: Callable[[str], None]
) -> dict[str, Any]:
    label = repo.dialect
    progress(f"{label}: preparing {n} assets ...")
    items = synthetic_assets(n, "a")
    raw_rows = _raw_rows(synthetic_assets(n, "r"), repo)
    progress(f"{label}: raw bulk write of {n} rows ...")
    raw_s = _raw_bulk(repo, raw_rows)
    raw_no_fk_s = _raw_bulk(repo, raw_rows, foreign_keys=False)
    progress(f"{label}: bulk_create of {n} assets ...")
    start = time.perf_counter()
    repo.bulk_create(items, actor="bench")
    ours_s = time.perf_counter() - start
    ours_rate, raw_rate = n / ours_s, n / raw_s

    progress(f"{label}: create, search and lineage latencies ...")
    result = {
        "backend": label,
        "assets": n,
        "bulk_create_per_s": round(ours_rate),
        "raw_bulk_per_s": round(raw_rate),
        "raw_client": "binary COPY (psycopg)" if label == "postgres" else "sqlite3 executemany",
        "raw_table": "same columns, constraints, indexes and foreign keys",
        "bulk_ratio": round(ours_rate / raw_rate, 3),
        "raw_bulk_without_foreign_keys_per_s": round(n / raw_no_fk_s),
        "bulk_ratio_without_foreign_keys": round(ours_rate * raw_no_fk_s / n, 3),
        **_latencies(repo, items, repeats),
    }
    result["targets"] = {
        "bulk >= 0.6x raw COPY (same table, foreign keys included)": ours_rate >= 0.6 * raw_rate,
        "bulk >= 100k/s (raw COPY itself is the ceiling here)": ours_rate >= 100_000,
        "create p50 <= 2 ms": result["create_p50_ms"] <= 2,
        "search p50 <= 3 ms (every query)": max(result["search_p50_ms"].values()) <= 3,
        "lineage p50 <= 2 ms": result["lineage_depth5_p50_ms"] <= 2,
    }
    return result


def _latencies(
    repo: AssetRepository, items: list[tuple[AssetMetadata, bytes]], repeats: int
) -> dict[str, Any]:
    """p50 of search (four kinds of query), create_asset and a depth-5 lineage, in
    that order, on the ``items`` bulk_create stored."""
    n = len(items)
    counter = iter(range(10**9))

    def create() -> None:
        i = next(counter)
        repo.create_asset(
            AssetMetadata("checkpoint", f"ckpt-{i}", tags={"bench"}), f"ckpt:{i}".encode()
        )

    middle = items[n // 2 + CHAIN - 1][0].asset_id  # the deepest asset of a chain: 9 ancestors
    queries = {
        "by name": AssetQuery().with_name("kernel-000123"),
        "type + tag, top 20 by compile time": AssetQuery()
        .with_type("kernel").with_tags(["family-7"]).order_by("compilation_time_ms").limit(20),
        "properties containment, 20": AssetQuery().with_properties({"target": "cpu42"}).limit(20),
        "children of a parent": AssetQuery().with_parent(items[n // 2][0].asset_id),
    }  # fmt: skip
    search = {
        name: wall_ms(lambda q=q: repo.search_assets(q), repeats) for name, q in queries.items()
    }
    create_ms = wall_ms(create, repeats)
    lineage_ms = wall_ms(lambda: repo.get_lineage(middle, depth=5), repeats)
    return {
        "create_p50_ms": create_ms,
        "search_p50_ms": search,
        "lineage_depth5_p50_ms": lineage_ms,
    }


def run(
    settings: Settings, quick: bool = False, progress: Callable[[str], None] = print
) -> dict[str, Any]:
    n = 10_000 if quick else 100_000
    repeats = 30 if quick else 200
    with _repositories(settings) as repos:
        results = [bench_backend(repo, n, repeats, progress) for _, repo in repos]
    return {
        "bench": "repository",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": settings.describe(),
        "results": results,
        "notes": []
        if settings.database_url
        else ["PostgreSQL skipped: ESPER_DATABASE_URL not set"],
    }
