"""What the repository stores about an asset, and the rules its fields obey.

``AssetMetadata`` is the record callers see. Every rule on a field is written
once, as a predicate (``_is_text``, ...) and a check that raises
``InvalidAssetField``: ``new_asset`` (create, bulk_create, update) and
``AssetQuery`` (via ``check_tags``) both use them. JSON entering the repository
(properties, property filters, ``--property`` text) is bounded here too.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any, NamedTuple, NoReturn

from esper_assets.errors import (
    InvalidAssetField,
    InvalidInput,
    InvalidQuery,
    InvalidValue,
    JsonTooDeep,
    PropertiesTooDeep,
    QueryTooDeep,
)
from esper_assets.storage.repository.backends import ASSET_COLUMNS, dump_json

ASSET_TYPES = ("blueprint", "kernel", "checkpoint")
STATES = ("active", "deprecated", "archived")
MAX_TAG_LENGTH = 64
# Deepest nesting of objects/arrays accepted in properties and property filters. Real
# properties are a few levels deep; 64 is far beyond any legitimate use, yet far below
# the ~1,000 frames at which CPython's json encoder/parser, psycopg's JSON loads and our
# own recursive matchers (json_contains, _scalars) would raise RecursionError.
MAX_JSON_DEPTH = 64


@dataclass
class AssetMetadata:
    asset_type: str
    name: str
    version: str = ""
    asset_id: str = ""
    created_at: datetime | None = None
    created_by: str = "esper"
    parent_id: str | None = None
    derived_from: list[str] = field(default_factory=list)
    tags: set[str] = field(default_factory=set)
    properties: dict[str, Any] = field(default_factory=dict)
    compilation_time_ms: float | None = None
    size_bytes: int | None = None
    checksum: str | None = None
    last_accessed: datetime | None = None
    access_count: int = 0
    state: str = "active"
    expires_at: datetime | None = None
    version_number: int = 0
    previous_version_id: str | None = None
    object_key: str | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly: sets as sorted lists, times as ISO strings."""
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


def jsonable(value: Any) -> Any:
    """A metadata value as JSON can hold it: sets as sorted lists, times as ISO strings."""
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


# -- rows: the metadata columns, and a row of them decoded ------------------------------
META_COLUMNS = tuple(c for c in ASSET_COLUMNS if c not in ("data", "created_event"))
META_SELECT = ", ".join(f"assets.{c}" for c in META_COLUMNS)


def metadata_from_row(db, row: Sequence) -> AssetMetadata:
    """The AssetMetadata of a row selected with META_SELECT, decoded by backend ``db``."""
    values = dict(zip(META_COLUMNS, row, strict=True))
    for column in ("created_at", "last_accessed", "expires_at"):
        values[column] = db.decode_time(values[column])
    values["derived_from"] = db.decode_list(values["derived_from"])
    values["tags"] = set(db.decode_list(values["tags"]))
    values["properties"] = db.decode_json(values["properties"])
    return AssetMetadata(**values)


# -- field rules: a predicate each, and a check that raises ------------------------------
def _is_text(value: object, limit: int = 255) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def check_text(what: str, value: object, limit: int = 255) -> str:
    if not _is_text(value, limit):
        _refuse_text(what, value, limit)
    return value  # type: ignore[return-value]


def _refuse_text(what: str, value: object, limit: int) -> NoReturn:
    raise InvalidAssetField(
        f"{what} must be printable text of 1..{limit} characters, got {value!r:.80}"
    )


def is_asset_id(value: object) -> bool:
    """Whether ``value`` could be an asset id (printable text of 1..255 characters)."""
    return _is_text(value)


def check_id(what: str, value: object) -> str:
    return check_text(what, value)


def check_choice(what: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise InvalidAssetField(f"{what} {value!r:.40} is unknown; use one of {list(choices)}")
    return value  # type: ignore[return-value]


def _is_tag(tag: object) -> bool:
    return _is_text(tag, MAX_TAG_LENGTH) and "," not in tag  # type: ignore[operator]


def check_tags(tags: object) -> list[str]:
    """Tags sorted and without repeats, or InvalidAssetField."""
    if tags.__class__ in (set, frozenset, list, tuple) and all(map(_is_tag, tags)):  # type: ignore[arg-type]
        return sorted(set(tags))  # type: ignore[arg-type]
    if isinstance(tags, str) or not isinstance(tags, Iterable):
        raise InvalidAssetField(f"tags must be a set or list of strings, got {type(tags).__name__}")
    out = set()
    for tag in tags:
        check_text("tag", tag, MAX_TAG_LENGTH)
        if "," in tag:
            raise InvalidAssetField(f"tag {tag!r} contains a comma; use separate tags")
        out.add(tag)
    return sorted(out)


def check_time(what: str, value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidAssetField(f"{what} must be a datetime or None, got {type(value).__name__}")
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _check_compile_ms(value: object) -> float | None:
    if value is None or (value.__class__ is float and -math.inf < value < math.inf):  # type: ignore[operator]
        return value  # type: ignore[return-value]
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidAssetField(f"compilation_time_ms must be a finite number, got {value!r}")
    return value


def _check_ids(value: object) -> list[str]:
    if value.__class__ is list and not value:
        return []
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise InvalidAssetField(
            f"derived_from must be a list of asset ids, got {type(value).__name__}"
        )
    return [check_id("derived_from id", i) for i in value]


def _check_data(data: object, max_bytes: int) -> bytes:
    if data.__class__ is not bytes:
        if isinstance(data, bytearray | memoryview):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise InvalidValue(f"asset data must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise InvalidValue(
            f"asset data is {len(data)} bytes, over max_asset_bytes={max_bytes}; raise the limit if intended"
        )
    return data


# -- JSON: bounded in depth wherever it enters -------------------------------------------
_CONTAINERS = (Mapping, list, tuple)


def _nests_deeper(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``value`` holds more than ``limit`` nested containers (objects and arrays,
    the outermost counting as 1). Iterative, so any depth (or a cycle) is safe to ask about;
    depth-first, so a deep chain is found after ~limit steps."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Iterable = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, _CONTAINERS))
    return False


def _too_deep(kind: type[JsonTooDeep], what: str) -> JsonTooDeep:
    return kind(
        f"{what} nest deeper than {MAX_JSON_DEPTH} levels of JSON objects/arrays, the limit "
        "(MAX_JSON_DEPTH) that keeps every JSON encoder, parser and matcher on its "
        "recursion-safe side; flatten them (e.g. join nested keys into dotted names)"
    )


def _encode_json_bounded(
    value: dict, what: str, invalid: type[InvalidInput], too_deep: type[JsonTooDeep]
) -> str:
    """Compact JSON text of ``value``, refusing non-JSON values, NaN and deep nesting."""
    try:
        text = dump_json(value)
    except RecursionError:
        if _nests_deeper(value):
            raise _too_deep(too_deep, what) from None
        raise  # shallow data on an exhausted stack: not the caller's input at fault
    except (TypeError, ValueError) as exc:
        raise invalid(f"{what} are not JSON: {exc}") from None
    # Depth needs at least that many brackets: most values are done after two C-speed counts.
    if text.count("{") + text.count("[") > MAX_JSON_DEPTH and _nests_deeper(value):
        raise _too_deep(too_deep, what)
    return text


def _properties_json(properties: object) -> str:
    if not isinstance(properties, Mapping):
        raise InvalidAssetField(
            f"properties must be a JSON object (dict), got {type(properties).__name__}"
        )
    return _encode_json_bounded(
        properties if properties.__class__ is dict else dict(properties),
        "properties",
        InvalidAssetField,
        PropertiesTooDeep,
    )


def check_query_properties(properties: object) -> dict[str, Any]:
    if not isinstance(properties, Mapping):
        raise InvalidQuery(
            f"with_properties: properties must be a JSON object (dict), got {type(properties).__name__}"
        )
    text = _encode_json_bounded(
        dict(properties), "with_properties: properties", InvalidQuery, QueryTooDeep
    )
    # round trip: normalises keys to str and tuples to lists (depth is bounded by now)
    return json.loads(text)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_properties_json(text: str, what: str = "--property") -> dict[str, Any]:
    """Parse user-supplied JSON text meant for ``AssetQuery.with_properties`` (the CLI's
    ``--property``): an object without NaN/Infinity, nested at most MAX_JSON_DEPTH deep.
    Raises QueryTooDeep / InvalidQuery naming ``what``; never a RecursionError."""
    if not isinstance(text, str | bytes | bytearray):
        raise InvalidQuery(f"{what} must be JSON text, got {type(text).__name__}")
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise _too_deep(QueryTooDeep, f"{what}: the properties") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, bad UTF-8
        raise InvalidQuery(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidQuery(
            f'{what} must be a JSON object such as {{"arch": "vgg"}}, got a JSON {type(value).__name__}'
        )
    if _nests_deeper(value):
        raise _too_deep(QueryTooDeep, f"{what}: the properties")
    return value


# -- an item to create, validated ---------------------------------------------------------
class NewAsset(NamedTuple):
    """One validated item to create (a tuple: bulk_create builds one per row)."""

    asset_id: str
    asset_type: str
    name: str
    version: str
    created_by: str
    parent_id: str | None
    derived_from: list[str]
    tags: list[str]
    properties_json: str
    compilation_time_ms: float | None
    size_bytes: int
    checksum: str
    data: bytes
    state: str
    expires_at: datetime | None


def new_asset(meta: AssetMetadata, data: object, max_bytes: int) -> NewAsset:
    """Validate one item to create and normalise it (no AssetMetadata copy: bulk_create
    calls this per row). Each check's fast path is the same predicate its refusal uses."""
    data = _check_data(data, max_bytes)
    compile_ms = _check_compile_ms(meta.compilation_time_ms)
    properties_json = _properties_json(meta.properties)
    asset_type = check_choice("asset_type", meta.asset_type, ASSET_TYPES)
    name = check_text("name", meta.name)
    version = meta.version and check_text("version", meta.version, 64)
    asset_id = check_id("asset_id", meta.asset_id) if meta.asset_id else uuid.uuid4().hex
    created_by = check_text("created_by", meta.created_by)
    parent_id = meta.parent_id
    if parent_id is not None:
        check_id("parent_id", parent_id)
    derived_from = _check_ids(meta.derived_from)
    tags = check_tags(meta.tags)
    state = check_choice("state", meta.state, STATES)
    return NewAsset(
        asset_id, asset_type, name, version, created_by, parent_id, derived_from, tags,
        properties_json, compile_ms, len(data), hashlib.sha256(data).hexdigest(), data, state,
        check_time("expires_at", meta.expires_at),
    )  # fmt: skip


def validated(meta: AssetMetadata, data: object, max_bytes: int) -> AssetMetadata:
    """A normalised copy of ``meta`` (checksum, size and a generated id set), or an
    InvalidInput; the same rules as create (update_asset checks its changes with it)."""
    new = new_asset(meta, data, max_bytes)
    copy = object.__new__(AssetMetadata)  # no __init__: the fields are checked already
    copy.__dict__ = {
        **meta.__dict__,
        "asset_id": new.asset_id,
        "version": new.version or "",
        "derived_from": new.derived_from,
        "tags": set(new.tags),
        "properties": dict(meta.properties),
        "expires_at": new.expires_at,
        "size_bytes": new.size_bytes,
        "checksum": new.checksum,
    }
    return copy
