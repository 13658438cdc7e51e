"""The asset repository: ``AssetRepository``, ``AssetMetadata``, ``AssetQuery``
(``repository``) over its two SQL dialects (``backends``).

May import: ``esper_assets.errors``, ``esper_assets.settings``, ``storage.db``,
``storage.objects``, and the cache's SQLite connection handling (see backends.py).
"""

from esper_assets.storage.repository.repository import (
    AssetMetadata,
    AssetQuery,
    AssetRepository,
)

__all__ = ["AssetMetadata", "AssetQuery", "AssetRepository"]
