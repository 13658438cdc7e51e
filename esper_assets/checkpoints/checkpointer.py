"""Checkpointer: what a training loop calls every step; it saves (in the background)
only when ``every`` has passed since the last save it started, and, given a
``retention`` policy, applies it to its run after each save (in the background too).

May import: ``esper_assets.errors``, ``checkpoints.store``, ``checkpoints.retention``,
``checkpoints.manifest``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from esper_assets.checkpoints.manifest import check_name
from esper_assets.checkpoints.retention import RetentionPolicy, RetentionReport, apply_retention
from esper_assets.checkpoints.store import CheckpointInfo, CheckpointStore
from esper_assets.errors import InvalidInput, RetentionFailed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _InFlight:
    """A save started, and the retention that runs once it is done (if any)."""

    save: Future[CheckpointInfo]
    retention: Future[RetentionReport | None] | None


class Checkpointer:
    """``maybe_save(step, components)`` each step; ``flush()`` before exiting.

    ``clock`` (seconds, monotonic) is injectable so tests need not wait. The first
    call saves; later ones when ``every`` has passed since the previous save began.
    One save at a time: a due step while the previous save still runs waits for it,
    so a slow store delays training rather than piling up copies of the weights.

    With ``retention``, each save is followed by ``apply_retention`` on this run
    only, on a thread of its own: the training thread waits for it only when the next
    save is due (or on ``flush()``) and it has not finished, so saves and retention
    never overlap and never queue up. Its reports go to ``retention_reports``. A
    failed retention loses no save (its info is in ``saved``): it is logged, and
    ``flush()`` raises a :class:`RetentionFailed` naming the run and the steps after
    which it failed, once.
    """

    def __init__(
        self,
        store: CheckpointStore,
        run_id: str,
        every: timedelta = timedelta(minutes=30),
        *,
        retention: RetentionPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store, self.run_id = store, check_name("run id", run_id)
        self.every_s = _checked_every(every).total_seconds()
        self.retention = _checked_policy(retention)
        self._clock = clock
        self._last: float | None = None
        self._pending: _InFlight | None = None
        self._retainer: ThreadPoolExecutor | None = None  # started with the first retention
        self._retention_failures: list[tuple[int, Exception]] = []  # (step saved, error)
        self.saved: list[CheckpointInfo] = []
        self.retention_reports: list[RetentionReport] = []

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
        save = self.store.save_async(self.run_id, step, components, **options)
        self._pending = _InFlight(save, self._retain_after(save))
        return save

    def flush(self) -> list[CheckpointInfo]:
        """Wait for the save (and retention) in flight; everything saved so far. Raises
        the save's error, else RetentionFailed if retention failed since the last flush."""
        try:
            self._collect()
        finally:
            self._stop_retainer()
        self._raise_retention_failures()
        return list(self.saved)

    # -- the save and retention in flight -----------------------------------------------
    def _collect(self) -> None:
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        info = pending.save.result()  # the save's own error propagates, as without retention
        self.saved.append(info)
        if pending.retention is not None:
            self._collect_retention(pending.retention, info.step)

    def _collect_retention(self, retention: Future[RetentionReport | None], step: int) -> None:
        try:
            report = retention.result()
        except Exception as exc:  # any failure: the save it followed is stored regardless
            log.warning("run %r: retention after step %d failed: %s", self.run_id, step, exc)
            self._retention_failures.append((step, exc))
            return
        if report is not None:
            self.retention_reports.append(report)

    def _retain_after(self, save: Future[CheckpointInfo]) -> Future[RetentionReport | None] | None:
        if self.retention is None:
            return None
        if self._retainer is None:
            self._retainer = ThreadPoolExecutor(1, thread_name_prefix="esper-retention")
        return self._retainer.submit(self._retain, save)

    def _retain(self, save: Future[CheckpointInfo]) -> RetentionReport | None:
        """On the retention thread: wait for the save, then apply the policy to this run.
        A failed save changed nothing, so there is nothing to retain (its error reaches
        the caller through ``_collect``)."""
        if save.exception() is not None:
            return None
        return apply_retention(self.store, self.retention, run_id=self.run_id)

    def _stop_retainer(self) -> None:
        """No thread outlives a flush; the next due save starts another."""
        if self._retainer is not None:
            retainer, self._retainer = self._retainer, None
            retainer.shutdown(wait=True)

    def _raise_retention_failures(self) -> None:
        if not self._retention_failures:
            return
        failures, self._retention_failures = self._retention_failures, []
        steps = [step for step, _ in failures]
        first = failures[0][1]
        raise RetentionFailed(
            f"run {self.run_id!r}: retention ({self.retention.describe()}) failed after the "
            f"save of step(s) {steps}; those checkpoints are stored. First error: {first}. "
            "Fix the cause; the next save applies the policy to the whole run again (or "
            f"run `esper checkpoints prune --run {self.run_id}` with the same rules)"
        ) from first


def _checked_every(every: object) -> timedelta:
    if not isinstance(every, timedelta) or every < timedelta(0):
        raise InvalidInput(f"every must be a non-negative timedelta, not {every!r:.60}")
    return every


def _checked_policy(retention: object) -> RetentionPolicy | None:
    if retention is not None and not isinstance(retention, RetentionPolicy):
        raise InvalidInput(
            f"retention must be a RetentionPolicy or None, not {type(retention).__name__}; "
            "e.g. RetentionPolicy(keep_last=5, action='delete')"
        )
    return retention
