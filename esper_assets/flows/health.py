"""The kernel cache's health, without Dagster: each tier's ping and breaker
(``cache.health()``) plus a write-read-delete probe through the cache. ``esper health``
prints it; the ``kernel_cache_healthy`` asset check records it on a schedule."""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from esper_assets.errors import EsperError
from esper_assets.storage import PersistentKernelCache
from esper_assets.storage.cache import framing

__all__ = ["PROBE_BYTES", "probe_cache", "unhealthy"]

PROBE_BYTES = 1024


def probe_cache(cache: PersistentKernelCache) -> dict[str, dict[str, Any]]:
    """``cache.health()`` per tier, each with a ``probe``: one small value put through
    the cache, read back from every tier that took it (its frame's checksum verified),
    invalidated, and read again to see it gone. A tier whose probe failed is
    ``failing`` even if its ping answered."""
    report = cache.health()
    kernel_id, data = f"health-probe-{uuid.uuid4().hex}", os.urandom(PROBE_BYTES)
    took, put_ms, put_error = _timed(lambda: set(cache.put(kernel_id, data)))
    for level, tier in report.items():
        tier["probe"] = {"write_ms": put_ms, "written": level in (took or ())}
        if put_error:  # a durable tier refused it: no tier can be read back
            tier["probe"]["error"] = put_error
        elif level != "l1" and level in took:
            _read_back(cache, level, kernel_id, data, tier["probe"])
    _, delete_ms, delete_error = _timed(lambda: cache.invalidate(kernel_id))
    for level, tier in report.items():
        probe = tier["probe"]
        probe["delete_ms"] = delete_ms
        if delete_error:
            probe.setdefault("error", delete_error)
        elif level != "l1" and level in (took or ()):
            gone, _, error = _timed(lambda level=level: cache.tier(level).get(kernel_id) is None)
            probe["deleted"] = bool(gone)
            if error:
                probe.setdefault("error", error)
        if tier["status"] == "healthy" and not _probe_ok(probe):
            tier["status"] = "failing"
    return report


def unhealthy(report: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The tiers that are not healthy, each with why (its error, else its status)."""
    return {
        level: tier.get("error") or tier.get("probe", {}).get("error") or tier["status"]
        for level, tier in report.items()
        if tier["status"] != "healthy"
    }


def _read_back(cache, level: str, kernel_id: str, data: bytes, probe: dict) -> None:
    def read() -> bool:
        blob = cache.tier(level).get(kernel_id)
        if blob is None:
            return False
        # L4 may hand back a stored object that is not a frame; a frame is verified
        return not isinstance(blob, bytes | bytearray) or (
            cache.codecs.decode(framing.unpack(blob)) == data
        )

    probe["read"], probe["read_ms"], error = _timed(read)
    if error:
        probe["read"], probe["error"] = False, error


def _timed(call) -> tuple[Any, float, str | None]:
    """``call()``'s result, its milliseconds, and the EsperError it raised (as text)."""
    start = time.perf_counter()
    try:
        result, error = call(), None
    except EsperError as exc:
        result, error = None, f"{type(exc).__name__}: {exc}"
    return result, round((time.perf_counter() - start) * 1e3, 2), error


def _probe_ok(probe: dict) -> bool:
    return "error" not in probe and probe.get("read", True) and probe.get("deleted", True)
