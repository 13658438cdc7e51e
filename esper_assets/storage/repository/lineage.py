"""Lineage: each asset's parent, walked up (ancestors) and down (descendants), and the
check that a new parent does not make a cycle. Functions over a backend ``db``."""

from __future__ import annotations

from typing import Any

from esper_assets.errors import InvalidQuery, LineageCycle
from esper_assets.storage.repository.records import META_SELECT, AssetMetadata, metadata_from_row

# Nearest first; asset_id is the first column. The step is a scalar subquery, not a
# join: with a join SQLite builds a Bloom filter over the whole table at every step
# (13 ms at 100k assets instead of 0.05 ms). A NULL parent ends the walk.
_ANCESTORS_SQL = (
    "WITH RECURSIVE up(asset_id, depth) AS ("
    " SELECT parent_id, 1 FROM assets WHERE asset_id = %s"
    " UNION ALL SELECT (SELECT a.parent_id FROM assets a WHERE a.asset_id = up.asset_id), up.depth + 1"
    " FROM up WHERE up.asset_id IS NOT NULL AND up.depth < %s)"
    f" SELECT {META_SELECT} FROM up JOIN assets ON assets.asset_id = up.asset_id ORDER BY up.depth"
)
_DESCENDANTS_SQL = (
    "WITH RECURSIVE down(asset_id, depth) AS ("
    " SELECT asset_id, 1 FROM assets WHERE parent_id = %s"
    " UNION ALL SELECT a.asset_id, down.depth + 1 FROM assets a JOIN down ON a.parent_id = down.asset_id"
    " WHERE down.depth < %s)"
    f" SELECT {META_SELECT}, down.depth FROM down JOIN assets ON assets.asset_id = down.asset_id"
    " ORDER BY down.depth, assets.created_at, assets.asset_id"
)


def check_depth(depth: object) -> int:
    if not isinstance(depth, int) or not 1 <= depth <= 100:
        raise InvalidQuery(f"depth must be an integer from 1 to 100, got {depth!r}")
    return depth


def ancestors(db, asset_id: str, depth: int) -> list[AssetMetadata]:
    """``asset_id``'s ancestors, nearest first, up to ``depth`` levels."""
    with db.read() as conn:
        rows_up = db.fetchall(conn, _ANCESTORS_SQL, (asset_id, depth))
    return [metadata_from_row(db, r) for r in rows_up]


def lineage(db, asset: AssetMetadata, depth: int) -> dict[str, Any]:
    """``asset``'s parent, children, ancestors and descendants, ``depth`` levels each way."""
    ancestors_ = ancestors(db, asset.asset_id, depth)
    with db.read() as conn:
        rows_down = db.fetchall(conn, _DESCENDANTS_SQL, (asset.asset_id, depth))
    descendants = [(metadata_from_row(db, r[:-1]), r[-1]) for r in rows_down]
    return {
        "asset": asset,
        "parent": ancestors_[0] if ancestors_ else None,
        "children": [d for d, level in descendants if level == 1],
        "ancestors": ancestors_,
        "descendants": [d for d, _ in descendants],
    }


def refuse_cycle(db, conn, asset_id: str, new_parent: str) -> None:
    """Inside the write transaction, after every other lineage change has committed:
    PostgreSQL takes one lineage lock, SQLite's BEGIN IMMEDIATE already serialises."""
    db.lock_names(conn, ["lineage"])
    ancestors = db.fetchall(conn, _ANCESTORS_SQL, (new_parent, 10_000))
    if new_parent == asset_id or asset_id in {row[0] for row in ancestors}:
        raise LineageCycle(f"making {new_parent!r} the parent of {asset_id!r} would create a cycle")
