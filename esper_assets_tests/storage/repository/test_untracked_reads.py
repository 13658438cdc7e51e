"""``get_asset(..., record_access=False)``: a bookkeeping read (garbage collection,
retention) returns the same verified content but is not counted as a use, so it
cannot make an asset look hot to cache warming, ``deprecate_unused`` or analytics."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from esper_assets.errors import AssetExpired
from esper_assets_tests.storage.repository.conftest import THRESHOLD, blob, is_utc, meta


def usage(repo, asset_id):
    m = repo.get_metadata(asset_id)
    return m.access_count, m.last_accessed


def test_untracked_reads_return_the_content_and_count_nothing(repo, other):
    small_data, large_data = blob(), blob(THRESHOLD * 2)  # inline and object-store
    small = repo.create_asset(meta("untracked"), small_data)
    large = repo.create_asset(meta("untracked-big"), large_data)
    for asset_id, data in ((small, small_data), (large, large_data)):
        got_meta, got = repo.get_asset(asset_id, record_access=False)
        assert (got_meta.asset_id, got) == (asset_id, data)

    assert repo.flush_access() == 0
    assert usage(other, small) == usage(other, large) == (0, None)

    repo.get_asset(small)  # the default still counts
    repo.flush_access()
    count, last = usage(other, small)
    assert count == 1 and is_utc(last)
    repo.get_asset(small, record_access=False)
    repo.flush_access()
    assert usage(other, small) == (count, last)


def test_untracked_reads_keep_the_other_rules(repo):
    gone = repo.create_asset(meta("untracked-expired"), blob())
    repo.update_asset(gone, {"expires_at": datetime.now(UTC)})
    with pytest.raises(AssetExpired, match="expired at"):
        repo.get_asset(gone, record_access=False)
    assert repo.flush_access() == 0
