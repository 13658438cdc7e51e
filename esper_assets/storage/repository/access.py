"""Access tracking: reads are counted in memory and written in batches, so that a
read never writes to the database."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

from esper_assets.errors import StorageError
from esper_assets.storage.repository.records import is_asset_id

log = logging.getLogger(__name__)


class AccessCounts:
    """Pending (count, last read time) per asset id, flushed by :meth:`flush` into the
    backend ``db`` (a PostgresAssets or SqliteAssets): every ``interval_s`` by a daemon
    thread started with :meth:`start`, and whenever the repository asks."""

    def __init__(self, db, interval_s: float) -> None:
        self._db = db
        self._pending: dict[str, list] = {}  # asset_id -> [count, last access time]
        self._lock = threading.Lock()
        self._dropped = 0
        self._stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._flush_periodically,
            args=(interval_s,),
            name="esper-assets-access",
            daemon=True,
        )

    def start(self) -> None:
        self._flusher.start()

    def stop(self) -> None:
        """Stop the flusher thread (the caller flushes what is left)."""
        self._stop.set()
        self._flusher.join(timeout=5)

    def note(self, asset_id: str) -> None:
        """One read of ``asset_id``, now."""
        with self._lock:
            entry = self._pending.setdefault(asset_id, [0, 0.0])
            entry[0] += 1
            entry[1] = time.time()

    @property
    def dropped(self) -> int:
        """Pending counts discarded because their id could never be an asset id."""
        return self._dropped

    def flush(self) -> int:
        """Write the pending counts; return how many asset ids were written.

        One statement that locks its rows in asset_id order first, so flushes from
        several processes cannot deadlock each other (see add_access_counts). Ids that
        cannot be asset ids (not printable text of 1..255 characters: a NUL byte, say)
        are dropped, counted in ``dropped`` and logged: one of them would otherwise
        fail every flush, and the valid counts with it, forever."""
        with self._lock:
            pending, self._pending = self._pending, {}
        counts = {i: c for i, c in pending.items() if is_asset_id(i)}
        if len(counts) < len(pending):
            self._drop([i for i in pending if i not in counts])
        if not counts:
            return 0
        db = self._db
        rows = [
            (i, n, db.encode_time(datetime.fromtimestamp(t, UTC))) for i, (n, t) in counts.items()
        ]
        try:
            with db.transaction() as conn:
                db.add_access_counts(conn, rows)
        except StorageError:
            self._keep_for_next_try(counts)
            raise
        return len(rows)

    def _drop(self, ids: list[str]) -> None:
        with self._lock:
            self._dropped += len(ids)
        log.warning(
            "access counts of %d invalid asset id(s) dropped (e.g. %.80r): ids must be "
            "printable text of 1..255 characters; the reads that recorded them are a bug",
            len(ids),
            ids[0],
        )

    def _keep_for_next_try(self, counts: dict[str, list]) -> None:
        with self._lock:
            for asset_id, (n, t) in counts.items():
                entry = self._pending.setdefault(asset_id, [0, 0.0])
                entry[0] += n
                entry[1] = max(entry[1], t)

    def _flush_periodically(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except StorageError as exc:
                log.warning("access counts not flushed yet: %s", exc)
