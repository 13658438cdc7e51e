"""Aggregates for monitoring, each a statement or two over an index, never a walk over
every asset in Python: audit events by kind (read incrementally), the kernels' compile
times as histogram buckets, the newest asset of each name, which ids exist.

``AssetTallies`` is a part of AssetRepository (like AssetLifecycle); it relies on the
repository's backend (``_db``) and writer (``_writer``).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from esper_assets.storage.repository.writes import chunks

# An event older than this is taken as committed for good. On PostgreSQL event ids are
# handed out when a row is inserted, not when its transaction commits, so a reader can
# see id 11 before id 10 exists for it; the longest transaction writing events (a bulk
# load: its "created" row first, then the COPY, ~40 s for 1,000,000 rows) is far shorter.
SETTLE_S = 900.0


@dataclass(frozen=True)
class EventCounts:
    """Audit events after the id a caller asked from, by kind."""

    through: int  # the newest settled event id: no event at or below it can still appear
    settled: dict[str, int]  # the events up to ``through``: count them once, for good
    recent: dict[str, int]  # the events after it: ask again next time (from ``through``)


class AssetTallies:
    """Counts for metrics (mixed into AssetRepository)."""

    def count_events(self, after: int = 0, settle_s: float = SETTLE_S) -> EventCounts:
        """Audit-trail rows with an event id above ``after``, by event. A caller keeping
        running totals adds ``settled`` to them and asks from ``through`` next time, so
        each look reads only the events of the last ``settle_s`` seconds again."""
        db = self._db
        cutoff = db.encode_time(datetime.now(UTC) - timedelta(seconds=settle_s))
        with db.read() as conn:
            through = db.fetchall(
                conn,
                "SELECT max(event_id) FROM asset_events WHERE event_id > %s AND at < %s",
                (after, cutoff),
            )[0][0]
            through = after if through is None else int(through)
            rows = db.fetchall(
                conn,
                "SELECT event, event_id <= %s, count(*) FROM asset_events WHERE event_id > %s"
                " GROUP BY 1, 2",
                (through, after),
            )
        settled = {event: int(n) for event, is_settled, n in rows if is_settled}
        recent = {event: int(n) for event, is_settled, n in rows if not is_settled}
        return EventCounts(through, settled, recent)

    def compile_times(self, bounds_ms: Sequence[float]) -> tuple[int, float, list[int]]:
        """Over the kernels that recorded a compile time: how many, the sum of their
        milliseconds, and for each bound how many took at most that long."""
        buckets = "".join(
            ", COALESCE(sum(CASE WHEN compilation_time_ms <= %s THEN 1 ELSE 0 END), 0)"
            for _ in bounds_ms
        )
        with self._db.read() as conn:
            count, total, *within = self._db.fetchall(
                conn,
                f"SELECT count(*), COALESCE(sum(compilation_time_ms), 0){buckets} FROM assets"
                " WHERE asset_type = 'kernel' AND compilation_time_ms IS NOT NULL",
                [float(b) for b in bounds_ms],
            )[0]
        return int(count), float(total), [int(n) for n in within]

    def newest_created(self, asset_type: str, names: Collection[str]) -> dict[str, datetime]:
        """Each of ``names`` that has an asset of ``asset_type`` -> when its newest was
        created (the (type, name, version) index answers it)."""
        db, newest = self._db, {}
        with db.read() as conn:
            for chunk in chunks(sorted(names)):
                where, params = db.in_list("name", chunk)
                for name, created in db.fetchall(
                    conn,
                    f"SELECT name, max(created_at) FROM assets WHERE asset_type = %s AND {where}"
                    " GROUP BY name",
                    [asset_type, *params],
                ):
                    newest[name] = db.decode_time(created)
        return newest

    def existing_ids(self, ids: Collection[str]) -> set[str]:
        """The ids among ``ids`` that are assets, in any state."""
        with self._db.read() as conn:
            return self._writer.existing_ids(conn, set(ids))
