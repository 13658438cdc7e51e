"""L2 debt: the ids whose Redis copy may be stale because a put or an invalidation
did not reach Redis (its breaker was open, or the call timed out).

A Redis that was paused or cut off (not restarted empty) still holds their old
values, or may even apply the timed-out write late. So they are fenced in L2
before the next call to it (:meth:`L2Debt.settle`, by the L2 slot), and written to
L3's change log (:meth:`L2Debt.take_to_share`, by the maintainer) so that every
other process fences them too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from esper_assets.errors import StorageError
from esper_assets.storage.cache.tiers.redis import RedisTier

L2_DEBT_LIMIT = 100_000  # ids remembered while Redis is away; past this, L2 is cleared on return


class L2Debt:
    def __init__(self, wake: threading.Event, share: bool) -> None:
        """``wake`` is set on every missed write (the maintainer shares it at once);
        ``share``: there is an L3 to tell the other processes through."""
        self._ids: set[str] = set()
        self._overflow = False
        self._lock = threading.Lock()
        self._to_share: list[str] = []  # not yet written to L3's change log
        self._wake = wake
        self._share = share

    @property
    def owed(self) -> bool:
        """Must L2 be settled before it is used again?"""
        return bool(self._ids or self._overflow)

    @property
    def unshared(self) -> int:
        """How many ids L3's change log has not been told about."""
        return len(self._to_share)

    def note(self, keys: Iterable[str]) -> None:
        """Remember ids whose put or invalidate did not reach L2."""
        keys = list(keys)
        with self._lock:
            self._ids.update(keys)
            if len(self._ids) > L2_DEBT_LIMIT:  # too many to track: drop all of L2 instead
                self._ids.clear()
                self._overflow = True
            if self._share and len(self._to_share) < L2_DEBT_LIMIT:
                self._to_share.extend(keys)
        self._wake.set()  # tell the other processes now, from the maintenance thread

    def take_on(self, keys: Iterable[str]) -> None:
        """Ids another process could not update in L2 (from L3's change log)."""
        with self._lock:
            self._ids.update(keys)

    def settle(self, l2: RedisTier) -> None:
        """Fence the possibly stale ids in L2; on failure keep them and re-raise."""
        with self._lock:
            keys, self._ids = list(self._ids), set()
            overflow, self._overflow = self._overflow, False
        try:
            if overflow:
                l2.clear()
            for i in range(0, len(keys), 1000):
                l2.fence_many(keys[i : i + 1000], announce=True)
        except StorageError:
            with self._lock:
                self._ids.update(keys)
                self._overflow |= overflow
            raise

    def take_to_share(self) -> list[str]:
        with self._lock:
            keys, self._to_share = self._to_share, []
        return keys

    def share_later(self, keys: list[str]) -> None:
        """L3 could not be reached: try ``keys`` again on the next tick, first."""
        with self._lock:
            self._to_share[:0] = keys
