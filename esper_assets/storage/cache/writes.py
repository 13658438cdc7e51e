"""The write path: what ``put`` checks, and how a value reaches the tiers.

Write-through stores into the durable tiers (L4 objects before the L3 rows that
point at them) while the fast ones are written beside them on the cache's pool;
a put is acknowledged only once the durable tiers have it. Write-back holds the
value in :class:`WriteBack` and writes L1 and L2 only; the maintainer flushes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from esper_assets.errors import InvalidValue
from esper_assets.storage.cache import framing
from esper_assets.storage.cache.config import CacheConfig, check_kernel_id
from esper_assets.storage.cache.framing import Codecs
from esper_assets.storage.cache.slots import Pending, TierSlots
from esper_assets.storage.cache.write_back import WriteBack


class Writer:
    def __init__(
        self,
        config: CacheConfig,
        codecs: Codecs,
        slots: TierSlots,
        pool: ThreadPoolExecutor,
        check_open: Callable[[], None],
    ) -> None:
        self._config = config
        self._codecs = codecs
        self._slots = slots
        self._pool = pool
        self._check_open = check_open
        self.write_back = WriteBack(config, self.persist)

    def prepare(self, kernel_id: str, data: bytes, metadata: Mapping[str, Any] | None) -> Pending:
        """Check a put's id, value and metadata, and encode the value once."""
        self._check_open()
        check_kernel_id(kernel_id)
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise InvalidValue(
                f"value for kernel {kernel_id!r} must be bytes, got {type(data).__name__}"
            )
        if len(data) > self._config.max_value_bytes:
            raise InvalidValue(
                f"value for kernel {kernel_id!r} is {len(data)} bytes, over max_value_bytes="
                f"{self._config.max_value_bytes}; raise CacheConfig.max_value_bytes if this is intended"
            )
        try:
            metadata = dict(metadata or {})
            # allow_nan=False: NaN/Infinity are not JSON; L3 would refuse them at write time.
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidValue(
                f"metadata for kernel {kernel_id!r} is not JSON-serialisable: {exc}"
            ) from None
        return Pending(
            kernel_id,
            data,
            self._codecs.encode(data),
            metadata,
            framing.now_ms(),
            self._slots.is_large(len(data)),
        )

    def put_through(self, entries: list[Pending]) -> list[str]:
        slots = self._slots
        durable = slots.durable_for(entries)
        fast = [s for s in slots.remote if s not in durable]
        side = {s: self._pool.submit(s.store_latest, entries) for s in fast}
        try:
            self.persist(entries)
        except BaseException:
            for slot, future in side.items():
                future.result()
                if slot is slots.l2:  # never leave a value readable that was not stored durably
                    # (a plain delete: the durable copy is still the old one, so a reader
                    # that promotes it again is right)
                    keys = [e.key for e in entries]
                    slot.call(slot.tier.delete_many, keys, missed=keys)
            raise
        written = [s.level for s, f in side.items() if f.result()]
        written += [s.level for s in durable]
        if slots.l1 is not None:
            stored = [slots.l1.put(e.key, e.value) for e in entries]
            if all(stored):
                written.insert(0, "l1")
        return sorted(written)

    def put_back(self, entry: Pending) -> list[str]:
        over = self.write_back.add(entry)
        slots = self._slots
        written = ["l1"] if slots.l1 is not None and slots.l1.put(entry.key, entry.value) else []
        if slots.l2 is not None and slots.l2.store_latest([entry]):
            written.append("l2")
        if over:  # back-pressure: a writer faster than the durable tier waits for it
            self.write_back.flush()
        # Otherwise the maintenance thread flushes every write_back_interval_s, in one batch.
        return written

    def persist(self, entries: list[Pending]) -> None:
        """Write to the durable tiers (L4 objects before the L3 rows that point at them)."""
        for slot in self._slots.durable_for(entries):
            batch = [e for e in entries if slot.takes(e)]
            if batch:
                slot.store_durably(batch)
