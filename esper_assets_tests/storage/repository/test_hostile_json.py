"""Deeply nested JSON never reaches a recursive encoder, parser or matcher (issue 8).

~3,000 levels of nesting in an asset's properties, in a search's property filter
or in the ``--property`` text of ``esper assets search`` used to surface as a raw
RecursionError (or, a little shallower, to be stored and then crash whatever walks
it). The repository bounds nesting at MAX_JSON_DEPTH where JSON enters and raises
an InvalidInput subclass naming the field and the limit; nothing is written.
"""

from __future__ import annotations

import json

import pytest

from esper_assets.errors import (
    InvalidAssetField,
    InvalidInput,
    InvalidQuery,
    JsonTooDeep,
)
from esper_assets.storage.repository import (
    MAX_JSON_DEPTH,
    AssetMetadata,
    AssetQuery,
    AssetRepository,
    parse_properties_json,
)

HOSTILE = 3_000


@pytest.fixture
def repo(make_repo, backend) -> AssetRepository:
    return make_repo(backend, access_flush_interval_s=3600.0)


def nested_dicts(depth: int) -> dict:
    """A JSON object ``depth`` containers deep, the outermost counting as 1."""
    value: object = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value  # type: ignore[return-value]


def nested_lists(depth: int) -> dict:
    """An object holding lists: ``depth`` containers in all, the object included."""
    value: object = 1
    for _ in range(depth - 1):
        value = [value]
    return {"k": value}


def meta(name: str, properties: dict) -> AssetMetadata:
    return AssetMetadata(asset_type="kernel", name=name, properties=properties)


def assert_names_field_and_limit(exc: Exception, field: str) -> None:
    message = str(exc)
    assert field in message
    assert str(MAX_JSON_DEPTH) in message


def test_the_limit_is_generous_and_below_the_interpreter_recursion_limit():
    assert 32 <= MAX_JSON_DEPTH <= 100
    assert issubclass(JsonTooDeep, InvalidInput) and issubclass(JsonTooDeep, ValueError)


# -- create ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [nested_dicts, nested_lists])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, HOSTILE, 100_000])
def test_create_with_too_deep_properties_is_refused(repo, shape, depth):
    with pytest.raises(JsonTooDeep) as info:
        repo.create_asset(meta("deep", shape(depth)), b"data")
    assert isinstance(info.value, InvalidAssetField)
    assert_names_field_and_limit(info.value, "properties")
    with pytest.raises(JsonTooDeep):
        repo.bulk_create([(meta("fine", {}), b"fine"), (meta("deep", shape(depth)), b"deep")])
    assert repo.search_assets(AssetQuery().include_expired()) == []


@pytest.mark.parametrize("shape", [nested_dicts, nested_lists])
def test_properties_at_the_limit_are_stored_and_found(repo, shape):
    properties = shape(MAX_JSON_DEPTH)
    aid = repo.create_asset(meta("at-limit", properties), b"data")
    assert repo.get_metadata(aid).properties == properties
    assert [m.asset_id for m in repo.search_assets(AssetQuery().with_properties(properties))] == [
        aid
    ]
    assert [m.asset_id for m in repo.search_assets(AssetQuery().text("leaf"))] == (
        [aid] if shape is nested_dicts else []
    )


# -- update ------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, HOSTILE])
def test_update_with_too_deep_properties_changes_nothing(repo, depth):
    aid = repo.create_asset(meta("mutable", {"x": 1}), b"v1")
    with pytest.raises(JsonTooDeep) as info:
        repo.update_asset(aid, {"properties": nested_dicts(depth)})
    assert_names_field_and_limit(info.value, "properties")
    with pytest.raises(JsonTooDeep):
        repo.update_asset(aid, {"properties": nested_lists(depth)}, new_data=b"v2")
    assert repo.get_metadata(aid).properties == {"x": 1}
    assert len(repo.search_assets(AssetQuery())) == 1
    assert [e["event"] for e in repo.get_audit_log(aid)] == ["created"]


# -- query -------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [nested_dicts, nested_lists])
@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, HOSTILE])
def test_query_with_too_deep_properties_is_refused_at_build_time(shape, depth):
    with pytest.raises(JsonTooDeep) as info:
        AssetQuery().with_properties(shape(depth))
    assert isinstance(info.value, InvalidQuery)
    assert_names_field_and_limit(info.value, "with_properties")


# -- the --property text of `esper assets search` ------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        '{"k":' * HOSTILE + "1" + "}" * HOSTILE,
        '{"k":' + "[" * HOSTILE + "]" * HOSTILE + "}",
        "[" * 200_000,  # not even closed: refused for depth, not a crash
        '{"k":' * (MAX_JSON_DEPTH + 1) + "1" + "}" * (MAX_JSON_DEPTH + 1),
    ],
)
def test_parse_properties_json_refuses_deep_text(text):
    with pytest.raises(JsonTooDeep) as info:
        parse_properties_json(text)
    assert isinstance(info.value, InvalidQuery)
    assert_names_field_and_limit(info.value, "--property")
    with pytest.raises(JsonTooDeep):
        AssetQuery().with_properties_json(text)


def test_parse_properties_json_accepts_depth_up_to_the_limit_and_brackets_in_strings():
    deep = nested_dicts(MAX_JSON_DEPTH)
    assert parse_properties_json(json.dumps(deep)) == deep
    brackets = {"pattern": "[" * 10_000 + "{" * 10_000, "n": [1, [2]]}
    assert parse_properties_json(json.dumps(brackets)) == brackets
    query = AssetQuery().with_properties_json('{"arch": "vgg"}')
    assert query == AssetQuery().with_properties({"arch": "vgg"})


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "not JSON"),
        ('{"x": NaN}', "NaN"),
        ("[1, 2]", "object"),
        ('"text"', "object"),
    ],
)
def test_parse_properties_json_explains_other_bad_text(text, why):
    with pytest.raises(InvalidQuery) as info:
        parse_properties_json(text)
    assert "--property" in str(info.value) and why in str(info.value)


def test_parse_properties_json_names_the_field_it_is_given():
    with pytest.raises(JsonTooDeep, match="ESPER_X"):
        parse_properties_json("[" * HOSTILE + "]" * HOSTILE, what="ESPER_X")
