"""Checkpointer: what a training loop calls every step; it saves (in the background)
only when ``every`` has passed since the last save it started.

May import: ``checkpoints.store``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

from esper_assets.checkpoints.store import CheckpointInfo, CheckpointStore


class Checkpointer:
    """``maybe_save(step, components)`` each step; ``flush()`` before exiting.

    ``clock`` (seconds, monotonic) is injectable so tests need not wait. The first
    call saves; later ones when ``every`` has passed since the previous save began.
    One save at a time: a due step while the previous save still runs waits for it,
    so a slow store delays training rather than piling up copies of the weights.
    """

    def __init__(
        self,
        store: CheckpointStore,
        run_id: str,
        every: timedelta = timedelta(minutes=30),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.run_id = store, run_id
        self.every_s = every.total_seconds()
        self._clock = clock
        self._last: float | None = None
        self._pending: Future[CheckpointInfo] | None = None
        self.saved: list[CheckpointInfo] = []

    def due(self) -> bool:
        return self._last is None or self._clock() - self._last >= self.every_s

    def maybe_save(
        self, step: int, components: Mapping[str, object], **options: Any
    ) -> Future[CheckpointInfo] | None:
        """Start a save of ``step`` when due (its future), else None."""
        if not self.due():
            return None
        self._collect()
        self._last = self._clock()
        self._pending = self.store.save_async(self.run_id, step, components, **options)
        return self._pending

    def flush(self) -> list[CheckpointInfo]:
        """Wait for the save in flight; everything saved so far (raises its error)."""
        self._collect()
        return list(self.saved)

    def _collect(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.saved.append(pending.result())
