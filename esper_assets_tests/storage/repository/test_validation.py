"""AssetRepository refuses bad input before writing anything, and accepts the
edges of valid input, on both backends.
"""

from __future__ import annotations

from esper_assets.errors import (
    InvalidAssetField,
    InvalidInput,
    InvalidValue,
)
from esper_assets.storage.repository import AssetMetadata, AssetQuery
from esper_assets_tests.storage.repository.conftest import (
    MAX_BYTES,
    THRESHOLD,
    blob,
    count,
    found,
    meta,
    objects,
)

# -- bad input --------------------------------------------------------------------------
LARGE = object()  # sentinel: a valid payload above the threshold
# (what, metadata fields, data, the InvalidInput subclass errors.py documents for it)
BAD_CREATES = [
    ("unknown type", {"asset_type": "model"}, LARGE, InvalidAssetField),
    ("unknown state", {"state": "deleted"}, LARGE, InvalidAssetField),
    ("empty tag", {"tags": {""}}, LARGE, InvalidAssetField),
    ("long tag", {"tags": {"x" * 65}}, LARGE, InvalidAssetField),
    ("comma tag", {"tags": {"a,b"}}, LARGE, InvalidAssetField),
    ("non-str tag", {"tags": {5}}, LARGE, InvalidAssetField),
    ("unprintable tag", {"tags": {"a\nb"}}, LARGE, InvalidAssetField),
    ("empty name", {"name": ""}, LARGE, InvalidAssetField),
    ("long name", {"name": "n" * 256}, LARGE, InvalidAssetField),
    ("unprintable name", {"name": "a\x00b"}, LARGE, InvalidAssetField),
    ("non-str name", {"name": 5}, LARGE, InvalidAssetField),
    ("object property", {"properties": {"x": object()}}, LARGE, InvalidAssetField),
    ("NaN property", {"properties": {"x": float("nan")}}, LARGE, InvalidAssetField),
    ("nested NaN property", {"properties": {"a": {"b": [float("nan")]}}}, LARGE, InvalidAssetField),
    ("list properties", {"properties": [1, 2]}, LARGE, InvalidAssetField),
    ("str properties", {"properties": "{}"}, LARGE, InvalidAssetField),
    ("long asset_id", {"asset_id": "i" * 256}, LARGE, InvalidAssetField),
    ("unprintable asset_id", {"asset_id": "a\x00b"}, LARGE, InvalidAssetField),
    ("non-str asset_id", {"asset_id": 5}, LARGE, InvalidAssetField),
    # the create path's fast checks must fall back to these refusals
    ("infinite compile time", {"compilation_time_ms": float("inf")}, LARGE, InvalidAssetField),
    ("NaN compile time", {"compilation_time_ms": float("nan")}, LARGE, InvalidAssetField),
    ("str compile time", {"compilation_time_ms": "5"}, LARGE, InvalidAssetField),
    ("str tags", {"tags": "abc"}, LARGE, InvalidAssetField),
    ("bad tag in a list", {"tags": ["ok", "a,b"]}, LARGE, InvalidAssetField),
    ("empty created_by", {"created_by": ""}, LARGE, InvalidAssetField),
    ("long version", {"version": "v" * 65}, LARGE, InvalidAssetField),
    ("non-str parent_id", {"parent_id": 5}, LARGE, InvalidAssetField),
    ("str derived_from", {"derived_from": "abc"}, LARGE, InvalidAssetField),
    ("non-datetime expires_at", {"expires_at": "tomorrow"}, LARGE, InvalidAssetField),
    ("oversize data", {}, b"\x01" * (MAX_BYTES + 1), InvalidValue),
    ("str data", {}, "text", InvalidValue),
    ("None data", {}, None, InvalidValue),
    ("int data", {}, 12, InvalidValue),
]


def test_bad_input_raises_and_writes_nothing(repo, store):
    repo.create_asset(meta("baseline"), blob(THRESHOLD * 2))
    rows, stored = count(repo), objects(store)
    failures = []
    for label, fields, data, expected in BAD_CREATES:
        fields = {"asset_type": "kernel", "name": f"bad {label}", **fields}
        payload = blob(THRESHOLD * 2) if data is LARGE else data
        try:
            repo.create_asset(AssetMetadata(**fields), payload)
        except InvalidInput as exc:
            if not isinstance(exc, expected):
                failures.append(f"{label}: {type(exc).__name__}, expected {expected.__name__}")
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(f"{label}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{label}: accepted")
        if count(repo) != rows or objects(store) != stored:
            failures.append(f"{label}: something was written")
            rows, stored = count(repo), objects(store)
    assert failures == []


def test_edges_of_valid_input_are_accepted(repo):
    payload = blob(100)
    aid = repo.create_asset(
        meta("n" * 255, tags={"t" * 64}, asset_id="i" * 255, properties={"é": ["ü", None]}),
        payload,
    )
    assert aid == "i" * 255
    m, data = repo.get_asset(aid)
    assert data == payload and m.name == "n" * 255 and set(m.tags) == {"t" * 64}
    assert m.properties == {"é": ["ü", None]}
    biggest = blob(MAX_BYTES)
    big = repo.create_asset(meta("at-the-limit"), biggest)
    assert repo.get_asset(big)[1] == biggest
    uni = repo.create_asset(meta("héllo wörld ✓"), blob())
    assert found(repo, AssetQuery().with_name("héllo wörld ✓")) == {uni}
