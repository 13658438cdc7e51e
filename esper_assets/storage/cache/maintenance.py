"""The cache's background upkeep, on one daemon thread ("esper-cache-maintenance").

Every tick (the shortest of ``invalidation_poll_s``, ``access_flush_interval_s`` and,
in write-back mode, ``write_back_interval_s``; sooner when a write misses L2) it:

1. writes this process's L2 debt to L3's change log, for the other processes;
2. reads L3's change log: drops from L1 what other processes deleted or overwrote,
   and takes on their L2 debt;
3. in write-back mode, flushes the dirty values (a failure is logged and retried);
4. every ``access_flush_interval_s``, flushes the access counts ``get`` gathered to L3.

:meth:`Maintainer.run_once` does the same work once, in the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from esper_assets.errors import FlushError
from esper_assets.storage.cache.config import CacheConfig, is_valid_id
from esper_assets.storage.cache.slots import UNAVAILABLE, TierSlots
from esper_assets.storage.cache.write_back import WriteBack

log = logging.getLogger("esper_assets.storage.cache")

CHANGE_LOG_PAGE = 10_000  # more changes than this between two looks: drop all of L1 instead


class Maintainer:
    def __init__(
        self,
        config: CacheConfig,
        slots: TierSlots,
        write_back: WriteBack,
        take_access_counts: Callable[[], dict[str, int]],
        wake: threading.Event,
    ) -> None:
        """``take_access_counts`` hands over (and resets) the counts gathered since the
        last call; ``wake`` cuts a tick's wait short."""
        self._config = config
        self._slots = slots
        self._write_back = write_back
        self._take_access_counts = take_access_counts
        self._wake = wake
        self._stop = threading.Event()
        self._debt = slots.l2.debt if slots.l2 is not None else None
        self._log_cursor: str | None = None
        self._thread: threading.Thread | None = None

    # -- the thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name="esper-cache-maintenance", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5) -> None:
        """End the background thread (waits up to ``timeout`` for its tick to finish)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        c = self._config
        interval = min(c.access_flush_interval_s, c.invalidation_poll_s)
        if c.write_mode == "write_back":
            interval = min(interval, c.write_back_interval_s)
        last_access_flush = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.share_l2_debt()
            self.read_change_log()
            if c.write_mode == "write_back" and self._write_back.dirty:
                try:
                    self._write_back.flush()
                except FlushError as exc:
                    log.warning("write-back flush failed, will retry: %s", exc)
                    self._stop.wait(min(5.0, interval * 4))
            if time.monotonic() - last_access_flush >= c.access_flush_interval_s:
                self.flush_access_counts()
                last_access_flush = time.monotonic()

    def run_once(self) -> None:
        """One tick's work now, in this thread, the access counts included; a failed
        write-back flush raises FlushError here instead of being retried."""
        self.share_l2_debt()
        self.read_change_log()
        if self._config.write_mode == "write_back" and self._write_back.dirty:
            self._write_back.flush()
        self.flush_access_counts()

    # -- the work ----------------------------------------------------------------------------
    def flush_access_counts(self) -> None:
        counts = self._take_access_counts()
        # get() counts before it checks the id (the L1 hit path stays a dict lookup), so
        # a bad id may be here: one would make the database refuse the whole batch.
        counts = {k: n for k, n in counts.items() if is_valid_id(k) and n > 0}
        l3 = self._slots.l3
        if counts and l3 is not None:
            l3.call(l3.tier.record_access, counts)

    def read_change_log(self) -> None:
        """Drop from L1 what other processes deleted or overwrote in L3 since the last
        look, and take on their L2 debt (ids whose Redis copy they could not update)."""
        slots = self._slots
        l3 = slots.l3
        if l3 is None or (slots.l1 is None and slots.l2 is None):
            return
        starting = self._log_cursor is None
        changes = l3.call(
            l3.tier.changes_since, self._log_cursor, CHANGE_LOG_PAGE, l3.log_retention_s
        )
        if changes is UNAVAILABLE:
            return
        if changes.ids is None or starting:
            # Too much changed, or (starting late, L3 was away) L1 may have filled
            # before we knew where the log stood.
            slots.drop_all_local()
        else:
            for kernel_id in changes.ids:
                slots.drop_local(kernel_id)
        if changes.l2_stale and self._debt is not None:
            self._debt.take_on(changes.l2_stale)
        self._log_cursor = changes.cursor

    def share_l2_debt(self) -> None:
        """Write this process's L2 debt to L3, where every process reads it."""
        if self._debt is None:
            return
        keys = self._debt.take_to_share()
        l3 = self._slots.l3
        if not keys or l3.call(l3.tier.mark_l2_stale, keys) is not UNAVAILABLE:
            return
        if l3.breaker.state == "closed":
            # L3 answered and refused (a read-only replica, say): no retry can help.
            log.warning(
                "L3 refused to record %d id(s) whose Redis copy may be stale; other "
                "processes may read them from L2 until their TTL",
                len(keys),
            )
            return
        self._debt.share_later(keys)  # unreachable: try again on the next tick

    @property
    def unshared_l2_debt(self) -> int:
        """Ids whose Redis copy may be stale and that L3's change log has not been told."""
        return 0 if self._debt is None else self._debt.unshared
