"""Dagster resources: thin builders of storage objects.

Service locations and secrets come from ESPER_* environment variables, read by
:class:`esper_assets.settings.Settings` inside the run process, so they never
enter Dagster run config, the event log or asset metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from esper_assets.storage import PersistentKernelCache


class KernelCacheResource(dg.ConfigurableResource):
    """The multi-tier kernel cache, configured from the environment."""

    l1_size_mb: float = 256
    write_mode: str = "write_through"

    @contextmanager
    def open(self) -> Iterator[PersistentKernelCache]:
        cache = PersistentKernelCache.from_env(
            l1_size_mb=self.l1_size_mb, write_mode=self.write_mode
        )
        try:
            yield cache
        finally:
            cache.close()
