"""The life of assets after creation: deprecation (one, the unused, by policy),
archiving to cold storage, collecting objects no row points at; and what the
repository reports about it (usage analytics, each asset's audit log).

``AssetLifecycle`` is a part of AssetRepository, kept in its own module so that
each reads in one sitting; it relies on the repository's backend (``_db``),
object store (``_store``), writer (``_writer``), checksum guard (``_guard``),
``flush_access`` and ``search_assets``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from esper_assets.errors import AssetNotFound, CorruptValue
from esper_assets.storage.repository.query import AssetQuery
from esper_assets.storage.repository.records import (
    AssetMetadata,
    check_id,
    check_text,
    check_time,
)
from esper_assets.storage.repository.writes import chunks, record_event


class AssetLifecycle:
    """Deprecate, archive, retire, collect garbage, report usage and the audit trail
    (mixed into AssetRepository)."""

    def deprecate_asset(self, asset_id: str, reason: str, actor: str = "esper") -> None:
        check_id("asset_id", asset_id)
        check_text("reason", reason, 1000)
        with self._db.transaction() as conn:
            if (
                self._db.execute(
                    conn, "UPDATE assets SET state = 'deprecated' WHERE asset_id = %s", (asset_id,)
                )
                != 1
            ):
                raise AssetNotFound(f"no asset {asset_id!r}")
            record_event(self._db, conn, asset_id, "deprecated", actor, {"reason": reason})

    def archive_assets(
        self, older_than: datetime, move_to_cold_storage: bool = True, actor: str = "esper"
    ) -> int:
        """Archive assets created before ``older_than``; move their data under ``archive/``."""
        cutoff = self._db.encode_time(check_time("older_than", older_than))
        with self._db.read() as conn:
            ids = [r[0] for r in self._db.fetchall(
                conn, "SELECT asset_id FROM assets WHERE created_at < %s AND state <> 'archived'", (cutoff,)
            )]  # fmt: skip
        moving = move_to_cold_storage and self._store is not None
        archived = 0
        for asset_id in ids:
            try:
                self._archive_one(asset_id, moving, actor)
            except CorruptValue:
                continue  # logged and counted; the damaged copy stays where it is, unarchived
            archived += 1
        return archived

    def _archive_one(self, asset_id: str, moving: bool, actor: str) -> None:
        with self._db.read() as conn:
            data, object_key, checksum = self._db.fetchall(
                conn,
                "SELECT data, object_key, checksum FROM assets WHERE asset_id = %s",
                (asset_id,),
            )[0]
        archive_key, old_key = f"archive/{asset_id}", None
        if moving and object_key != archive_key:
            if data is not None:
                payload, where = bytes(data), self._guard.inline_location()
            else:
                payload, where = (
                    self._store.get(object_key),
                    self._guard.object_location(self._store, object_key),
                )
            if payload is not None:  # never copy damaged bytes over to the archive
                self._guard.verify(asset_id, checksum, payload, where)
            self._store.put(archive_key, payload)  # copy first: the row never points at nothing
            old_key = object_key
        with self._db.transaction() as conn:
            if moving:
                self._db.execute(
                    conn, "UPDATE assets SET state = 'archived', data = NULL, object_key = %s WHERE asset_id = %s",
                    (archive_key, asset_id),
                )  # fmt: skip
            else:
                self._db.execute(
                    conn, "UPDATE assets SET state = 'archived' WHERE asset_id = %s", (asset_id,)
                )
            record_event(
                self._db,
                conn,
                asset_id,
                "archived",
                actor,
                {"object_key": archive_key if moving else object_key},
            )
        if old_key:
            self._writer.delete_objects([old_key])

    def deprecate_unused(
        self, unused_for: timedelta, now: datetime | None = None, actor: str = "esper"
    ) -> list[str]:
        """Deprecate active assets nobody read (or, never read, created) within ``unused_for``."""
        self.flush_access()
        cutoff = (now or datetime.now(UTC)) - unused_for
        with self._db.read() as conn:
            ids = [r[0] for r in self._db.fetchall(
                conn,
                "SELECT asset_id FROM assets WHERE state = 'active'"
                " AND COALESCE(last_accessed, created_at) < %s ORDER BY asset_id",
                (self._db.encode_time(cutoff),),
            )]  # fmt: skip
        for asset_id in ids:
            self.deprecate_asset(asset_id, f"unused for {unused_for}", actor)
        return ids

    def apply_retirement_policy(
        self, policy: Callable[[AssetMetadata], str | None], actor: str = "esper"
    ) -> list[str]:
        """Deprecate every active asset for which ``policy`` returns a reason."""
        retired = []
        for meta in self.search_assets(AssetQuery().with_state("active").include_expired()):
            reason = policy(meta)
            if reason:
                self.deprecate_asset(meta.asset_id, reason, actor)
                retired.append(meta.asset_id)
        return retired

    # -- garbage -------------------------------------------------------------------------------
    def collect_garbage(self, grace: timedelta = timedelta(hours=1)) -> list[str]:
        """Delete objects under ``assets/`` that no row references and that are older than ``grace``.

        The grace period protects a create in progress, which writes its object
        before its row commits.
        """
        if self._store is None:
            return []
        cutoff = time.time() - grace.total_seconds()
        candidates = [key for key, _, modified in self._store.list("assets/") if modified <= cutoff]
        referenced: set[str] = set()
        with self._db.read() as conn:
            for chunk in chunks(candidates):
                where, params = self._db.in_list("object_key", chunk)
                referenced |= {
                    r[0]
                    for r in self._db.fetchall(
                        conn, f"SELECT object_key FROM assets WHERE {where}", params
                    )
                }
        orphans = [key for key in candidates if key not in referenced]
        self._writer.delete_objects(orphans)
        return orphans

    # -- analytics and audit -------------------------------------------------------------------
    def get_usage_analytics(self, hot: int = 10) -> dict[str, Any]:
        self.flush_access()
        db = self._db
        with db.read() as conn:
            by_type = dict(
                db.fetchall(conn, "SELECT asset_type, count(*) FROM assets GROUP BY asset_type")
            )
            by_state = dict(db.fetchall(conn, "SELECT state, count(*) FROM assets GROUP BY state"))
            total, size = db.fetchall(
                conn, "SELECT count(*), COALESCE(sum(size_bytes), 0) FROM assets"
            )[0]
            hot_rows = db.fetchall(
                conn,
                "SELECT asset_id, name, access_count FROM assets WHERE access_count > 0"
                " ORDER BY access_count DESC, asset_id LIMIT %s",
                (hot,),
            )
        return {
            "total_assets": int(total),
            "by_type": {k: int(v) for k, v in by_type.items()},
            "by_state": {k: int(v) for k, v in by_state.items()},
            "hot_assets": [
                {"asset_id": i, "name": n, "access_count": int(c)} for i, n, c in hot_rows
            ],
            "storage_size_bytes": int(size),
            "avg_asset_size_bytes": round(int(size) / total, 1) if total else 0,
        }

    def get_audit_log(self, asset_id: str) -> list[dict[str, Any]]:
        check_id("asset_id", asset_id)
        db = self._db
        with db.read() as conn:
            # Its own events, and the "created" event of the batch that created it (one
            # row for many assets, asset_id ''), with this asset's name and version as
            # details: the same entry a single create writes.
            rows = db.fetchall(
                conn,
                "SELECT event_id, event, actor, at, details FROM asset_events WHERE asset_id = %s"
                " UNION ALL SELECT e.event_id, e.event, e.actor, e.at,"
                " {json_object}('name', a.name, 'version', a.version)"
                " FROM assets a JOIN asset_events e ON e.event_id = a.created_event"
                " WHERE a.asset_id = %s AND e.asset_id = ''"
                " ORDER BY 1",
                (asset_id, asset_id),
            )
        return [
            {"event": e, "actor": a, "at": db.decode_time(at), "details": db.decode_json(d)}
            for _, e, a, at, d in rows
        ]
