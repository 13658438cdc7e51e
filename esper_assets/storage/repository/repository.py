"""AssetRepository: the system of record for blueprints, kernels and checkpoints.

Versions, tags, JSON properties, lineage, lifecycle state, access tracking and
an audit trail, on PostgreSQL or a SQLite file with one contract (see
docs/ASSET_REPOSITORY_API.md). Data at or under the large-object threshold is
stored inline; above it, in the object store, written before the row commits
and deleted again if the transaction fails.

The class is the contract and its wiring; the work is done in the package's other
modules (records, query, writes, lineage, lifecycle, access, integrity).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from esper_assets.errors import (
    AssetExpired,
    AssetNotFound,
    ConfigError,
    InvalidAssetField,
    StorageError,
)
from esper_assets.settings import Settings
from esper_assets.storage.objects import ObjectStore, object_store_from_settings
from esper_assets.storage.repository.access import AccessCounts
from esper_assets.storage.repository.backends import PostgresAssets, SqliteAssets
from esper_assets.storage.repository.integrity import ChecksumGuard
from esper_assets.storage.repository.lifecycle import AssetLifecycle
from esper_assets.storage.repository.lineage import ancestors, check_depth, lineage, refuse_cycle
from esper_assets.storage.repository.query import AssetQuery, search_sql
from esper_assets.storage.repository.records import (
    META_SELECT,
    AssetMetadata,
    check_id,
    jsonable,
    metadata_from_row,
    validated,
)
from esper_assets.storage.repository.tallies import AssetTallies
from esper_assets.storage.repository.writes import AssetWriter, record_event

UPDATABLE = frozenset(
    {"tags", "properties", "state", "expires_at", "parent_id", "derived_from",
     "compilation_time_ms", "created_by"}
)  # fmt: skip


class AssetRepository(AssetLifecycle, AssetTallies):
    """Thread-safe; one instance per process is enough (it pools connections).

    Create, read, update, search and lineage are here; deprecation, archiving,
    retirement, garbage, usage and the audit log come from AssetLifecycle
    (lifecycle.py), the counts metrics read from AssetTallies (tallies.py), so that
    no part is over ~250 lines."""

    def __init__(
        self,
        postgres_url: str | None = None,
        sqlite_path: str | None = None,
        object_store: ObjectStore | None = None,
        *,
        large_object_threshold: int = 1 << 20,
        max_asset_bytes: int = 512 << 20,
        access_flush_interval_s: float = 5.0,
        usage: Any = None,
    ) -> None:
        """``usage``: a UsageRecorder (esper_assets.analytics.events; not imported, the
        repository sits below analytics) told of each read that counts as an access."""
        if postgres_url:
            self._db: PostgresAssets | SqliteAssets = PostgresAssets(postgres_url)
        elif sqlite_path:
            self._db = SqliteAssets(sqlite_path)
        else:
            raise ConfigError(
                "AssetRepository needs postgres_url or sqlite_path (or use AssetRepository.from_env())"
            )
        self._store = object_store
        self._writer = AssetWriter(self._db, object_store, large_object_threshold)
        self._guard = ChecksumGuard(self._db.location)
        self.max_asset_bytes = max_asset_bytes
        self._access = AccessCounts(self._db, access_flush_interval_s)
        self._access.start()
        self.usage = usage

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: Any
    ) -> AssetRepository:
        return cls.from_settings(Settings.from_env(environ), **overrides)

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> AssetRepository:
        """On ``ESPER_DATABASE_URL`` (else the SQLite file under ``ESPER_HOME``), large
        objects in the store the settings name; ``overrides`` are constructor arguments."""
        options: dict[str, Any] = {
            "postgres_url": settings.database_url,
            "sqlite_path": None if settings.database_url else str(settings.sqlite_path),
        }
        if "object_store" not in overrides:
            options["object_store"] = object_store_from_settings(settings)
        return cls(**(options | overrides))

    @property
    def dialect(self) -> str:
        return self._db.dialect

    @property
    def location(self) -> str:
        """Where the rows live: a PostgreSQL URL without its password, or sqlite:///path."""
        return self._db.location

    @property
    def backend(self) -> PostgresAssets | SqliteAssets:
        """The SQL backend: ``read()`` / ``transaction()`` connections, ``fetchall`` and
        the dialect's encoders. For tools that reach the tables themselves (the bench,
        migrations checks); what it does to the rows bypasses the repository's rules."""
        return self._db

    @property
    def large_object_threshold(self) -> int:
        """Data over this many bytes is stored in the object store, not inline."""
        return self._writer.threshold

    @large_object_threshold.setter
    def large_object_threshold(self, value: int) -> None:
        self._writer.threshold = value

    # -- create ----------------------------------------------------------------------
    def create_asset(self, metadata: AssetMetadata, data: bytes, actor: str = "esper") -> str:
        return self._writer.create_many([(metadata, data)], actor, self.max_asset_bytes)[0]

    def bulk_create(
        self, items: Sequence[tuple[AssetMetadata, bytes]], actor: str = "esper"
    ) -> list[str]:
        """Create many assets in one transaction (binary COPY on PostgreSQL); ids in input order."""
        return self._writer.create_many(items, actor, self.max_asset_bytes) if items else []

    # -- read ------------------------------------------------------------------------
    def get_metadata(self, asset_id: str) -> AssetMetadata:
        check_id("asset_id", asset_id)
        with self._db.read() as conn:
            rows = self._db.fetchall(
                conn, f"SELECT {META_SELECT} FROM assets WHERE asset_id = %s", (asset_id,)
            )
        if not rows:
            raise AssetNotFound(f"no asset {asset_id!r}")
        return metadata_from_row(self._db, rows[0])

    def get_asset(
        self, asset_id: str, *, record_access: bool = True
    ) -> tuple[AssetMetadata, bytes]:
        """Metadata and content, the content verified against its checksum (CorruptValue
        if it does not match). The read counts as an access (see note_access) unless
        ``record_access=False``: for bookkeeping reads (garbage collection, retention)
        that must not make an asset look used to cache warming, ``deprecate_unused``
        or the usage analytics."""
        check_id("asset_id", asset_id)
        start = time.perf_counter()
        # Two tries: archiving may move the object between our row read and our object
        # read; the row read again then names the new place.
        for _ in range(2):
            meta, data = self._read_row(asset_id)
            if data is not None:
                where = self._guard.inline_location()
            elif self._store is not None:
                data = self._store.get(meta.object_key)
                where = self._guard.object_location(self._store, meta.object_key)
            if data is not None:
                data = bytes(data)
                self._guard.verify(asset_id, meta.checksum, data, where)
                if record_access:
                    self.note_access(asset_id)
                    self._record_usage(asset_id, len(data), start)
                return meta, data
        raise StorageError(
            f"asset {asset_id!r}: its data {meta.object_key!r} is missing from the object store"
        )

    def _record_usage(self, asset_id: str, nbytes: int, start: float) -> None:
        usage = self.usage
        if usage is not None:
            latency_us = (time.perf_counter() - start) * 1e6
            usage.record("repository", asset_id, "read", "repository", nbytes, latency_us)

    def _read_row(self, asset_id: str) -> tuple[AssetMetadata, bytes | None]:
        with self._db.read() as conn:
            rows = self._db.fetchall(
                conn, f"SELECT {META_SELECT}, data FROM assets WHERE asset_id = %s", (asset_id,)
            )
        if not rows:
            raise AssetNotFound(f"no asset {asset_id!r}")
        meta = metadata_from_row(self._db, rows[0][:-1])
        if meta.expires_at is not None and meta.expires_at <= datetime.now(UTC):
            raise AssetExpired(f"asset {asset_id!r} expired at {meta.expires_at.isoformat()}")
        return meta, rows[0][-1]

    @property
    def corrupt_reads(self) -> int:
        """Content reads refused because the bytes did not hash to the recorded checksum."""
        return self._guard.corrupt_reads

    # -- access tracking ------------------------------------------------------------------
    def note_access(self, asset_id: str) -> None:
        """Count one read of ``asset_id`` now; written by the next flush_access (every
        ``access_flush_interval_s``, at close, or when asked). get_asset calls it; a
        caller serving the content from elsewhere (its own cache) may too."""
        self._access.note(asset_id)

    @property
    def access_ids_dropped(self) -> int:
        """Pending access counts discarded because their id could never be an asset id."""
        return self._access.dropped

    def flush_access(self) -> int:
        """Write the batched access counts; return how many asset ids were written
        (see AccessCounts.flush: invalid ids are dropped and counted, not retried)."""
        return self._access.flush()

    # -- update ------------------------------------------------------------------------
    def update_asset(
        self,
        asset_id: str,
        updates: Mapping[str, Any],
        new_data: bytes | None = None,
        actor: str = "esper",
    ) -> str:
        allowed = UPDATABLE | ({"version"} if new_data is not None else set())
        unknown = set(updates) - allowed
        if unknown:
            raise InvalidAssetField(
                f"cannot update {sorted(unknown)}; updatable fields: {sorted(allowed)}"
            )
        old = self.get_metadata(asset_id)
        if not updates and new_data is None:
            return asset_id  # nothing to change
        if new_data is not None:
            return self._new_version(old, updates, new_data, actor)
        self._update_in_place(old, self._checked_updates(old, updates), actor)
        return asset_id

    def _new_version(
        self, old: AssetMetadata, updates: Mapping[str, Any], new_data: bytes, actor: str
    ) -> str:
        new = replace(old, asset_id="", version="", created_at=None, **dict(updates))
        new_id = self.create_asset(new, new_data, actor)
        with self._db.transaction() as conn:
            record_event(
                self._db, conn, old.asset_id, "new_version", actor, {"new_asset_id": new_id}
            )
        return new_id

    def _update_in_place(self, old: AssetMetadata, changed: dict[str, Any], actor: str) -> None:
        db, asset_id = self._db, old.asset_id
        encoders = {
            "tags": lambda v: db.encode_list(sorted(v)),
            "derived_from": db.encode_list,
            "properties": db.encode_json,
            "expires_at": db.encode_time,
        }
        assignments = ", ".join(f"{k} = %s" for k in changed)
        params = [encoders.get(k, lambda v: v)(v) for k, v in changed.items()]
        merged = replace(old, **changed)
        with db.transaction() as conn:
            self._writer.require_existing(
                conn, {r for r in [merged.parent_id, *merged.derived_from] if r}, set()
            )
            if changed.get("parent_id") is not None:
                refuse_cycle(db, conn, asset_id, changed["parent_id"])
            sql = f"UPDATE assets SET {assignments} WHERE asset_id = %s"
            if db.execute(conn, sql, [*params, asset_id]) != 1:
                raise AssetNotFound(f"no asset {asset_id!r}")
            details = {k: jsonable(v) for k, v in changed.items()}
            record_event(db, conn, asset_id, "updated", actor, details)

    @staticmethod
    def _checked_updates(old: AssetMetadata, updates: Mapping[str, Any]) -> dict[str, Any]:
        checked = validated(replace(old, **dict(updates)), b"", max_bytes=0)
        return {k: getattr(checked, k) for k in updates}

    # -- search and lineage -----------------------------------------------------------
    def search_assets(self, query: AssetQuery) -> list[AssetMetadata]:
        sql, params = search_sql(self._db, query)
        with self._db.read() as conn:
            rows = self._db.fetchall(conn, sql, params)
        return [metadata_from_row(self._db, r) for r in rows]

    def get_lineage(self, asset_id: str, depth: int = 5) -> dict[str, Any]:
        """The asset, its parent and children, and ``depth`` (1..100) levels of
        ancestors (nearest first) and descendants."""
        check_depth(depth)
        return lineage(self._db, self.get_metadata(asset_id), depth)

    def get_ancestry(self, asset_id: str, depth: int = 5) -> list[AssetMetadata]:
        """The asset, then ``depth`` (1..100) levels of its ancestors, nearest first:
        :meth:`get_lineage`'s chain upwards, without looking for descendants."""
        check_depth(depth)
        asset = self.get_metadata(asset_id)
        return [asset, *ancestors(self._db, asset_id, depth)]

    # -- statistics ----------------------------------------------------------------------
    def analyze(self) -> None:
        """Refresh planner statistics now rather than whenever autovacuum gets to it; on
        PostgreSQL also merge the GIN pending lists, which after a bulk load made a
        properties search spend 10 ms of its 16 ms scanning them."""
        with self._db.read(slow=True) as conn:
            conn.execute(
                "VACUUM (ANALYZE) assets" if self._db.dialect == "postgres" else "ANALYZE assets"
            )

    # -- lifecycle of the repository itself ---------------------------------------------------
    def close(self) -> None:
        self._access.stop()
        self.flush_access()
        self._db.close()

    def __enter__(self) -> AssetRepository:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
