"""L1: an in-process cache bounded by bytes, with TTL, eviction policy and admission.

Eviction decides *who leaves* (``lru``, ``lfu`` or ``fifo``); admission decides
*whether a newcomer may push someone out at all*. The admission filter is
TinyLFU-style: it remembers how often every key was asked for in a recent
window (including keys that are not cached) and admits a newcomer only if it has
been asked for more often than the entry it would evict. On skewed (Zipf)
traffic this keeps the heavy hitters that plain LRU lets one-hit wonders flush.

Counting is exact (a dict) rather than a count-min sketch: in Python a dict
increment is one C call while four hashed counter updates are four bytecode
round trips, and the window bounds the dict to ``sample_size`` keys. Every
``sample_size`` increments (30 per cached entry) all counts are halved and
keys seen once are forgotten, so old popularity fades.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from esper_assets.errors import ConfigError

# Python-object overhead per entry beyond the key and value objects themselves:
# the entry tuple, its float and int, the OrderedDict node and slot, and the
# frequency-window slot. Measured with tracemalloc (see test_memory_tier).
ENTRY_OVERHEAD = 240
WINDOW_PER_ENTRY = 30
_MAX_COUNT = 15  # like TinyLFU's 4-bit counters: caps how long an old favourite stays "hot"


_EMPTY_BYTES = sys.getsizeof(b"")  # a bytes object's size is this plus its length
_EMPTY_ASCII = sys.getsizeof("")  # so is an ASCII str's


def entry_charge(key: str, value: bytes) -> int:
    """Bytes one entry costs in L1, as the byte bound accounts it: ``sys.getsizeof`` of
    the key and the value plus ENTRY_OVERHEAD. For bytes values and ASCII keys the sizes
    are computed from their lengths (a getsizeof call costs ~0.3 us, and a cold
    get_many charges a hundred entries); other types ask getsizeof."""
    value_size = _EMPTY_BYTES + len(value) if type(value) is bytes else sys.getsizeof(value)
    ascii_key = type(key) is str and key.isascii()
    key_size = _EMPTY_ASCII + len(key) if ascii_key else sys.getsizeof(key)
    return value_size + key_size + ENTRY_OVERHEAD


class FrequencyWindow:
    """Approximate recent access frequency of keys, cached or not."""

    def __init__(self, sample_size: int = 4096) -> None:
        self.min_sample_size = sample_size
        self.sample_size = sample_size
        self._counts: dict[str, int] = {}
        self._additions = 0

    def increment(self, key: str) -> None:
        counts = self._counts
        count = counts.get(key, 0)
        if count < _MAX_COUNT:
            counts[key] = count + 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self._age()

    def estimate(self, key: str) -> int:
        return self._counts.get(key, 0)

    def resize(self, cached_entries: int) -> None:
        # TinyLFU's paper samples 10x the capacity; with exact counts a longer
        # window separates the Zipf tail better (measured: +5 points over LRU at
        # 10x, +9.5 at 30x, 1% capacity). Aging keeps the dict far below this bound.
        self.sample_size = max(self.min_sample_size, WINDOW_PER_ENTRY * cached_entries)

    def _age(self) -> None:
        self._counts = {k: c >> 1 for k, c in self._counts.items() if c > 1}
        self._additions //= 2


class _Order:
    """Eviction order for lru and fifo: an OrderedDict of keys, oldest first."""

    def __init__(self, move_on_hit: bool) -> None:
        self._keys: OrderedDict[str, None] = OrderedDict()
        self._move_on_hit = move_on_hit

    def add(self, key: str) -> None:
        self._keys[key] = None

    def touch(self, key: str) -> None:
        if self._move_on_hit:
            self._keys.move_to_end(key)

    def remove(self, key: str) -> None:
        del self._keys[key]

    def victims(self) -> Iterator[str]:
        return iter(self._keys)


class _LeastFrequent:
    """Eviction order for lfu: O(1) frequency buckets; ties leave oldest first."""

    def __init__(self) -> None:
        self._freq: dict[str, int] = {}
        self._buckets: dict[int, dict[str, None]] = {}

    def add(self, key: str) -> None:
        self._freq[key] = 1
        self._buckets.setdefault(1, {})[key] = None

    def touch(self, key: str) -> None:
        f = self._freq[key]
        self._unbucket(key, f)
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, {})[key] = None

    def remove(self, key: str) -> None:
        self._unbucket(key, self._freq.pop(key))

    def _unbucket(self, key: str, f: int) -> None:
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]

    def victims(self) -> Iterator[str]:
        for f in sorted(self._buckets):
            yield from self._buckets[f]


POLICIES = ("lru", "lfu", "fifo")


class Snapshot(NamedTuple):
    """What L1 held at one instant: key -> (value, expiry on ``time.monotonic``'s
    clock, bytes charged), and the bytes charged in all."""

    entries: dict[str, tuple[bytes, float, int]]
    used_bytes: int


class MemoryTier:
    """Thread-safe bytes-bounded L1. Stores raw values: no framing, no copies."""

    name = "l1"

    def __init__(
        self,
        max_bytes: int,
        ttl_seconds: float | None = 3600,
        policy: str = "lru",
        admission: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ConfigError(f"eviction_policy={policy!r} is unknown; use one of {list(POLICIES)}")
        self.max_bytes = max_bytes
        self.ttl_seconds = ttl_seconds
        self.policy = policy
        self._order = self._new_order()
        self._window = FrequencyWindow() if admission else None
        self._entries: dict[str, tuple[bytes, float, int]] = {}  # key -> (value, expires, charge)
        self._lock = threading.Lock()
        self.used_bytes = 0
        self.hits = self.misses = self.evictions = self.expirations = self.rejections = 0

    def _new_order(self) -> _Order | _LeastFrequent:
        return (
            _LeastFrequent() if self.policy == "lfu" else _Order(move_on_hit=self.policy == "lru")
        )

    # -- reads ------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        with self._lock:
            if self._window is not None:
                self._window.increment(key)
            entry = self._entries.get(key)
            if entry is not None:
                if entry[1] > time.monotonic():
                    self._order.touch(key)
                    self.hits += 1
                    return entry[0]
                self._remove(key)
                self.expirations += 1
            self.misses += 1
            return None

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """:meth:`get` of each key under one lock and one clock read."""
        found = {}
        with self._lock:
            # bound under the lock: clear() replaces these containers
            entries, window, order = self._entries, self._window, self._order
            now = time.monotonic()
            for key in keys:
                if window is not None:
                    window.increment(key)
                entry = entries.get(key)
                if entry is not None:
                    if entry[1] > now:
                        order.touch(key)
                        self.hits += 1
                        found[key] = entry[0]
                        continue
                    self._remove(key)
                    self.expirations += 1
                self.misses += 1
        return found

    def __contains__(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] > time.monotonic()

    # -- writes -----------------------------------------------------------
    def put(self, key: str, value: bytes, ttl_seconds: float | None = None) -> bool:
        """Store unless admission refuses it or it can never fit; True if stored."""
        return self.put_many({key: value}, ttl_seconds) == 1

    def put_many(self, items: Mapping[str, bytes], ttl_seconds: float | None = None) -> int:
        """:meth:`put` each item under one lock and one clock read; how many were stored."""
        ttl = self.ttl_seconds if ttl_seconds is None else ttl_seconds
        expires = time.monotonic() + ttl if ttl else float("inf")
        stored = 0
        with self._lock:
            entries, add_order = self._entries, self._order.add  # clear() replaces them
            for key, value in items.items():
                charge = entry_charge(key, value)
                # A cold get_many promotes whole batches: a newcomer that fits needs no
                # eviction and no admission decision, so only the others pay for a call.
                needs_room = key in entries or self.used_bytes + charge > self.max_bytes
                if needs_room and not self._make_room_for(key, charge):
                    continue
                entries[key] = (value, expires, charge)
                add_order(key)
                self.used_bytes += charge
                stored += 1
            if stored and self._window is not None:
                self._window.resize(len(entries))
        return stored

    def _make_room_for(self, key: str, charge: int) -> bool:
        """Drop ``key``'s old entry and evict what its ``charge`` needs (lock held);
        False, a rejection, when admission keeps the victims or it can never fit."""
        newcomer = key not in self._entries
        if not newcomer:
            self._remove(key)  # a replacement was admitted already
        if self._make_room(key, charge, admit_check=newcomer):
            return True
        self.rejections += 1
        return False

    def delete(self, key: str) -> bool:
        with self._lock:
            if key in self._entries:
                self._remove(key)
                return True
            return False

    def clear(self) -> None:
        # New containers rather than one removal per entry: an invalidation gap or a
        # cold read drops thousands at once. Admission's counts are kept (they are
        # about requests, not entries).
        with self._lock:
            self._entries = {}
            self._order = self._new_order()
            self.used_bytes = 0

    def cleanup(self) -> int:
        """Drop expired entries; return how many."""
        now = time.monotonic()
        with self._lock:
            expired = [k for k, e in self._entries.items() if e[1] <= now]
            for key in expired:
                self._remove(key)
            self.expirations += len(expired)
            return len(expired)

    def stats(self) -> dict[str, int | str]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._entries),
                "bytes": self.used_bytes,
                "max_bytes": self.max_bytes,
                "evictions": self.evictions,
                "expirations": self.expirations,
                "admission_rejections": self.rejections,
                "policy": self.policy,
                "admission": "tinylfu" if self._window is not None else "off",
            }

    def snapshot(self) -> Snapshot:
        """Every entry (expired ones too) and the byte count, taken under the lock."""
        with self._lock:
            return Snapshot(dict(self._entries), self.used_bytes)

    # -- internals (lock held) ----------------------------------------------
    def _remove(self, key: str) -> None:
        _, _, charge = self._entries.pop(key)
        self._order.remove(key)
        self.used_bytes -= charge

    def _make_room(self, key: str, charge: int, admit_check: bool) -> bool:
        needed = self.used_bytes + charge - self.max_bytes
        if needed <= 0:
            return True
        if charge > self.max_bytes:
            return False
        victims, freed = [], 0
        for victim in self._order.victims():
            victims.append(victim)
            freed += self._entries[victim][2]
            if freed >= needed:
                break
        if admit_check and self._window is not None:
            wanted = self._window.estimate(key)
            now = time.monotonic()
            # An expired victim is free to go; a live one only for a more popular newcomer.
            if any(
                self._entries[v][1] > now and self._window.estimate(v) >= wanted for v in victims
            ):
                return False
        for victim in victims:
            self._remove(victim)
            self.evictions += 1
        return True
