"""The read path below L1: write-back's pending values, single-flight loads, and the
waterfall L2 -> L3 -> L4 that promotes what it finds into the tiers that missed it.

A corrupt copy is a miss plus a counted corruption, repaired from a lower tier by
the same promotion. What a read loads goes into L1 unless an invalidation arrived
while it was loading (:meth:`TierSlots.fill_l1`).

With a usage recorder attached (``Reader.usage``) each read below L1 is recorded with
the tier that answered it ("miss" for none), its bytes and, for ``get``, its latency.
A write-back value not yet flushed is in this process's memory: it is left to be
counted with the L1 hits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from esper_assets.errors import CorruptValue
from esper_assets.storage.cache import framing
from esper_assets.storage.cache.config import CacheConfig, check_kernel_id
from esper_assets.storage.cache.framing import Codecs
from esper_assets.storage.cache.slots import UNAVAILABLE, Pending, TierSlot, TierSlots
from esper_assets.storage.cache.tiers.sql import IN_OBJECT_STORE
from esper_assets.storage.cache.write_back import WriteBack

log = logging.getLogger("esper_assets.storage.cache")


class UsageSink(Protocol):
    """What the cache tells a usage recorder (esper_assets.analytics.events.UsageRecorder;
    the cache may not import analytics, so it names only these methods)."""

    def record(
        self,
        source: str,
        id: str,
        op: str,
        tier: str,
        nbytes: int,
        latency_us: float | None = None,
        requests: int = 1,
    ) -> None: ...

    def record_many(self, source: str, op: str, reads: Iterable[tuple[str, str, int]]) -> None:
        """One untimed request per ``(id, tier, nbytes)``."""

    def add_reads(self, source: str, op: str, counts: Mapping[str, int]) -> None: ...

    def pull_before_flush(self, pull) -> None: ...

    def forget_puller(self, pull) -> None: ...


class Flight:
    """One in-progress load; followers block on ``done`` (held by the leader until it ends)."""

    __slots__ = ("done", "value", "error", "tier")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.value: bytes | None = None
        self.error: BaseException | None = None
        self.tier = "miss"  # the level that answered, for usage

    def wait(self) -> tuple[bytes | None, str]:
        with self.done:
            pass
        if self.error is not None:
            raise self.error
        return self.value, self.tier


class Reader:
    """Reads that L1 could not answer. Counts them (``requests``), the ids found
    nowhere (``not_found``) and the lower-tier loads ``get`` started (``loads``)."""

    def __init__(
        self, config: CacheConfig, codecs: Codecs, slots: TierSlots, write_back: WriteBack
    ) -> None:
        self._config = config
        self._codecs = codecs
        self._slots = slots
        self._write_back = write_back
        self._inflight: dict[str, Flight] = {}
        self._inflight_lock = threading.Lock()
        self.loads = 0  # lower-tier loads started by get(): single-flight keeps this low
        self.requests = 0
        self.not_found = 0
        self.usage: UsageSink | None = None

    def get(self, kernel_id: str) -> bytes | None:
        self.requests += 1
        pending = self._write_back.value(kernel_id)
        if pending is not None:
            return pending
        start = time.perf_counter()
        value, tier = self._load_once(kernel_id)
        if value is None:
            self.not_found += 1
        usage = self.usage
        if usage is not None:
            latency_us = (time.perf_counter() - start) * 1e6
            usage.record("cache", kernel_id, "get", tier, len(value or b""), latency_us)
        return value

    def _load_once(self, kernel_id: str) -> tuple[bytes | None, str]:
        """Single-flight: concurrent misses on one id share one lower-tier load."""
        with self._inflight_lock:
            flight = self._inflight.get(kernel_id)
            leader = flight is None
            if leader:
                flight = self._inflight[kernel_id] = Flight()
                self.loads += 1
        if not leader:
            return flight.wait()
        try:
            report: dict[str, str] = {}
            flight.value = self.read_through([kernel_id], report).get(kernel_id)
            flight.tier = report.get(kernel_id, "miss")
            return flight.value, flight.tier
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._inflight_lock:
                del self._inflight[kernel_id]
            flight.done.release()

    def get_many(self, missing: list[str], found: dict[str, bytes]) -> dict[str, bytes]:
        """Add to ``found`` the values of the ``missing`` ids (L1 missed them)."""
        self.requests += len(missing)
        if self._write_back.dirty:  # nothing waits to be flushed (or write-back is off)
            for kernel_id in missing:
                pending = self._write_back.value(kernel_id)
                if pending is not None:
                    found[kernel_id] = pending
            missing = [k for k in missing if k not in found]
        if missing:
            report: dict[str, str] = {}
            loaded = self.read_through(missing, report)
            self.not_found += len(missing) - len(loaded)
            found.update(loaded)
            self._record_many(missing, loaded, report)
        return found

    def _record_many(
        self, ids: list[str], loaded: dict[str, bytes], report: dict[str, str]
    ) -> None:
        """get_many's lower-tier reads, untimed: one round trip answered them all."""
        usage = self.usage
        if usage is None:
            return
        get = loaded.get
        usage.record_many(
            "cache",
            "get_many",
            [(i, report.get(i, "miss"), len(get(i, b""))) for i in ids],
        )

    def warm(self, kernel_ids: Iterable[str]) -> dict[str, str]:
        report: dict[str, str] = {}
        l1 = self._slots.l1
        for kernel_id in kernel_ids:
            kernel_id = check_kernel_id(kernel_id)
            if l1 is not None and kernel_id in l1:
                report[kernel_id] = "l1"
                continue
            self.read_through([kernel_id], report)
            report.setdefault(kernel_id, "missing")
        return report

    def read_through(
        self, ids: Sequence[str], report: dict[str, str] | None = None
    ) -> dict[str, bytes]:
        """Walk L2 -> L3 -> L4 for ``ids``, promoting hits into the tiers above."""
        slots = self._slots
        epoch = slots.l1_epoch
        found: dict[str, bytes] = {}
        missing = list(ids)
        pointers: set[str] = set()  # ids whose L3 row says "the value is in L4"
        look_lower: set[str] = set()  # pointers, and ids whose L3 copy was corrupt
        answered: list[TierSlot] = []  # slots that answered (and missed): promotion targets
        for slot in slots.remote:
            want = (
                self._l4_candidates(missing, look_lower, answered) if slot is slots.l4 else missing
            )
            if not want:
                continue
            answer = slot.fetch(want)
            if answer is UNAVAILABLE:
                continue
            # Frames are kept only to promote the values into the tiers above.
            hits, frames, nbytes = self._values_in(slot, answer, pointers, look_lower, answered)
            slot.stats.add_lookup(len(hits), len(want) - len(hits), nbytes)
            if answered:
                self._promote(hits, frames, answered, pointers)
            found.update(hits)
            if report is not None:
                report.update(dict.fromkeys(hits, slot.level))
            answered.append(slot)
            missing = [k for k in missing if k not in hits]
        slots.fill_l1(found, epoch)
        return found

    def _values_in(
        self,
        slot: TierSlot,
        answer: dict[str, Any],
        pointers: set[str],
        look_lower: set[str],
        upper: list[TierSlot],
    ) -> tuple[dict[str, bytes], dict[str, framing.Frame], int]:
        """The values in ``answer`` (what ``slot`` fetched), their frames when there are
        ``upper`` tiers to promote them into, and the bytes read. A pointer, an expired
        or a corrupt copy is a miss here: L3's send the read on to L4, L2's are
        discarded (so that the repair, a promotion that never overwrites, can land)."""
        now = framing.now_ms()
        frames: dict[str, framing.Frame] = {}
        if upper or len(answer) < 2:  # frames wanted, or no batch (get reads in two parts)
            values, others = {}, list(answer)
        else:  # most values of a batch pass the batch check
            values, others = framing.raw_values(answer, now, self._codecs.max_decoded_bytes)
        nbytes = sum(map(len, values.values())) + framing.HEADER_SIZE * len(values)
        for key in others:
            blob = answer[key]
            if blob is IN_OBJECT_STORE:
                pointers.add(key)
                look_lower.add(key)
                continue
            nbytes += len(blob)
            if (decoded := self._decode(slot, key, blob, now)) is not None:
                values[key], frames[key] = decoded
            elif slot is self._slots.l3:
                look_lower.add(key)
            elif slot is self._slots.l2:
                slot.call(slot.tier.discard, key, blob)
        return values, frames, nbytes

    def _l4_candidates(
        self, missing: list[str], look_lower: set[str], answered: list[TierSlot]
    ) -> list[str]:
        # When L3 answered, L4 holds only the large values L3 pointed at (unless archiving),
        # so a plain miss costs no object-store round trip.
        l3 = self._slots.l3
        if self._config.archive_to_l4 or l3 is None or l3 not in answered:
            return missing
        return [k for k in missing if k in look_lower]

    def _decode(
        self, slot: TierSlot, key: str, blob: bytes | framing.FrameParts, now: int
    ) -> tuple[bytes, framing.Frame] | None:
        try:
            try:
                frame = self._unframe(blob)
            except CorruptValue:
                if type(blob) is not framing.FrameParts or blob.atomic:
                    raise
                # Read in two commands: a write between them tears the frame. Ask again,
                # atomically, before calling the copy corrupt (``blob`` is updated so
                # that a discard compares against what is really stored).
                again = slot.call(slot.tier.get_parts, key, True)
                if again is UNAVAILABLE or again is None:
                    return None
                blob.head, blob.payload, blob.atomic = again.head, again.payload, True
                frame = self._unframe(blob)
            if frame.expired(now):
                return None
            return self._codecs.decode(frame), frame
        except CorruptValue as exc:
            slot.stats.add("corruptions")
            log.warning(
                "corrupt value for kernel %r in %s (%s); repairing from a lower tier",
                key,
                slot.level,
                exc,
            )
            return None

    @staticmethod
    def _unframe(blob: bytes | framing.FrameParts) -> framing.Frame:
        if type(blob) is framing.FrameParts:
            return framing.unpack_parts(blob.head, blob.payload)
        return framing.unpack(blob)

    def _promote(
        self,
        values: dict[str, bytes],
        frames: dict[str, framing.Frame],
        upper: list[TierSlot],
        pointers: set[str],
    ) -> None:
        """Copy hits into the faster tiers that missed them (this also repairs corrupt copies)."""
        if not frames:
            return
        entries = [
            Pending.found(key, values[key], frame, self._slots.is_large(len(values[key])))
            for key, frame in frames.items()
        ]
        l3 = self._slots.l3
        for slot in upper:
            batch = [e for e in entries if slot.takes(e) and not (slot is l3 and e.key in pointers)]
            if batch:
                slot.promote(batch)
