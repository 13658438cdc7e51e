"""Write-back: values acknowledged by ``put`` that the durable tiers do not have yet.

They are readable from here (a read checks them before any remote tier) until a
flush has stored them; a flush never drops a value put after it took its batch
(each put has a ``version``). What a crash can lose is in kernel_cache's docstring.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from esper_assets.errors import DurableWriteError, FlushError
from esper_assets.storage.cache.config import CacheConfig
from esper_assets.storage.cache.slots import Pending


class WriteBack:
    """The dirty values of one cache, and how they reach the durable tiers.

    ``lock`` guards the dirty set and the counters; ``flush_lock`` is held by a whole
    flush, so an invalidation can wait one out (see :meth:`discard`).
    """

    def __init__(self, config: CacheConfig, persist: Callable[[list[Pending]], None]) -> None:
        """``persist`` writes a batch to the durable tiers or raises DurableWriteError."""
        self.dirty: dict[str, Pending] = {}
        self.dirty_bytes = 0
        self.version = 0
        self.flushed = 0
        self.failures = 0
        self.last_error: str | None = None
        self.lock = threading.Lock()
        self.flush_lock = threading.Lock()
        self._config = config
        self._persist = persist

    def add(self, entry: Pending) -> bool:
        """Hold ``entry`` (replacing an older value of its id); True if over the byte bound."""
        with self.lock:
            self.version += 1
            entry.version = self.version
            old = self.dirty.get(entry.key)
            self.dirty_bytes += len(entry.payload.data) - (len(old.payload.data) if old else 0)
            self.dirty[entry.key] = entry
            return self.dirty_bytes > self._config.write_back_max_dirty_bytes

    def value(self, kernel_id: str) -> bytes | None:
        """The value a put left here for ``kernel_id``, if it is not flushed yet."""
        pending = self.dirty.get(kernel_id)
        return None if pending is None else pending.value

    def flush(self) -> int:
        """Write every dirty key to the durable tier now; raise FlushError if that fails."""
        with self.flush_lock:  # an invalidate() must not interleave with a flush of its id
            return self._flush_locked()

    def _flush_locked(self) -> int:
        with self.lock:
            batch = list(self.dirty.values())
        if not batch:
            return 0
        try:
            self._persist(batch)
        except DurableWriteError as exc:
            with self.lock:
                self.failures += 1
                self.last_error = str(exc)
                count = len(self.dirty)
            raise FlushError(
                f"{count} dirty kernel(s) not persisted, still held in memory: {exc}"
            ) from exc
        with self.lock:
            for entry in batch:
                current = self.dirty.get(entry.key)
                if current is not None and current.version == entry.version:
                    del self.dirty[entry.key]
                    self.dirty_bytes -= len(entry.payload.data)
            self.flushed += len(batch)
        return len(batch)

    def discard(self, kernel_id: str) -> None:
        """Forget ``kernel_id``'s dirty value (it is being invalidated).

        Taking the flush lock waits out an in-flight flush that may hold this id,
        so its upsert cannot land after the invalidation's delete and bring the value back.
        """
        with self.flush_lock, self.lock:
            pending = self.dirty.pop(kernel_id, None)
            if pending is not None:
                self.dirty_bytes -= len(pending.payload.data)

    def discard_all(self) -> int:
        """Forget every dirty value without storing it; return how many."""
        with self.flush_lock, self.lock:
            count = len(self.dirty)
            self.dirty.clear()
            self.dirty_bytes = 0
        return count

    def pending(self) -> dict[str, bytes]:
        """A snapshot: id -> value of every put not flushed yet."""
        with self.lock:
            return {key: entry.value for key, entry in self.dirty.items()}

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "dirty_bytes": self.dirty_bytes,
                "version": self.version,
                "flushed": self.flushed,
                "failures": self.failures,
                "last_error": self.last_error,
                "dirty": len(self.dirty),
            }
