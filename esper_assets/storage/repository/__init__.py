"""The asset repository: the system of record for blueprints, kernels and checkpoints.

Modules, each owning one thing (the package may import ``esper_assets.errors``,
``esper_assets.settings``, ``storage.db`` and ``storage.objects``; nothing from the
kernel cache):

- ``repository``: ``AssetRepository``, the contract and its wiring.
- ``records``: ``AssetMetadata``, the rules on its fields (written once), the
  validated ``NewAsset`` row, JSON bounds (``MAX_JSON_DEPTH``, ``parse_properties_json``).
- ``query``: ``AssetQuery`` and the SQL a search becomes.
- ``writes``: creating assets (duplicates, versions, large data to the object
  store), one audit-trail row (``record_event``).
- ``lineage``: ancestors, descendants, the no-cycle check.
- ``lifecycle``: deprecation, archiving, retirement, garbage, usage and audit log.
- ``tallies``: counts for metrics (audit events by kind, compile-time buckets, the
  newest asset per name, which ids exist), aggregated in SQL.
- ``access``: read counts gathered in memory and flushed in batches.
- ``integrity``: content reads checked against their checksum.
- ``backends``: the two SQL dialects (``PostgresAssets``, ``SqliteAssets``) over
  ``storage.db``'s connections; ``ASSET_COLUMNS``, the order of a full row.
"""

from esper_assets.storage.repository.backends import ASSET_COLUMNS
from esper_assets.storage.repository.query import AssetQuery
from esper_assets.storage.repository.records import (
    MAX_JSON_DEPTH,
    AssetMetadata,
    parse_properties_json,
)
from esper_assets.storage.repository.repository import AssetRepository

__all__ = [
    "ASSET_COLUMNS",
    "MAX_JSON_DEPTH",
    "AssetMetadata",
    "AssetQuery",
    "AssetRepository",
    "parse_properties_json",
]
