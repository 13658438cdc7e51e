"""AssetQuery, the immutable fluent search, and the SQL it becomes.

Every value is checked when the query is built (InvalidQuery), so a search only
runs queries that make sense; the SQL is written once, for both backends, with
their filters (tags, properties, text) asked of the backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from esper_assets.errors import InvalidAssetField, InvalidQuery
from esper_assets.storage.repository.records import (
    ASSET_TYPES,
    META_SELECT,
    STATES,
    check_query_properties,
    check_tags,
    parse_properties_json,
)

ORDER_FIELDS = (
    "created_at", "name", "version_number", "size_bytes", "compilation_time_ms",
    "access_count", "last_accessed",
)  # fmt: skip
MAX_LIMIT = 10_000


@dataclass(frozen=True)
class AssetQuery:
    """Immutable fluent query: every method returns a new AssetQuery."""

    asset_types: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    tags_match_all: bool = True
    properties: Mapping[str, Any] | None = None
    after: datetime | None = None
    before: datetime | None = None
    parent_id: str | None = None
    state: str | None = None
    checksum: str | None = None
    name: str | None = None
    text_search: str | None = None
    order_field: str = "created_at"
    ascending: bool = True
    limit_n: int | None = None
    offset_n: int = 0
    expired_too: bool = False

    def _with(self, **changes: Any) -> AssetQuery:
        return replace(self, **changes)

    def with_type(self, *asset_types: str) -> AssetQuery:
        for t in asset_types:
            if t not in ASSET_TYPES:
                raise InvalidQuery(
                    f"asset type {t!r:.40} is unknown; use one of {list(ASSET_TYPES)}"
                )
        return self._with(asset_types=tuple(asset_types))

    def with_tags(self, tags: Iterable[str], match: str = "all") -> AssetQuery:
        if match not in ("all", "any"):
            raise InvalidQuery(f"with_tags(match={match!r}): use 'all' or 'any'")
        try:
            checked = check_tags(tags)
        except InvalidAssetField as exc:
            raise InvalidQuery(str(exc)) from None
        return self._with(tags=tuple(checked), tags_match_all=match == "all")

    def with_properties(self, properties: Mapping[str, Any]) -> AssetQuery:
        return self._with(properties=check_query_properties(properties))

    def with_properties_json(self, text: str, what: str = "--property") -> AssetQuery:
        """with_properties from JSON text typed by a user (see parse_properties_json)."""
        return self.with_properties(parse_properties_json(text, what))

    def created_after(self, when: datetime) -> AssetQuery:
        return self._with(after=self._time(when))

    def created_before(self, when: datetime) -> AssetQuery:
        return self._with(before=self._time(when))

    def with_parent(self, parent_id: str) -> AssetQuery:
        return self._with(parent_id=self._str("parent id", parent_id))

    def with_state(self, state: str) -> AssetQuery:
        if state not in STATES:
            raise InvalidQuery(f"state {state!r:.40} is unknown; use one of {list(STATES)}")
        return self._with(state=state)

    def with_checksum(self, checksum: str) -> AssetQuery:
        return self._with(checksum=self._str("checksum", checksum))

    def with_name(self, name: str) -> AssetQuery:
        return self._with(name=self._str("name", name))

    def text(self, needle: str) -> AssetQuery:
        return self._with(text_search=self._str("text", needle))

    def order_by(self, field_name: str, ascending: bool = True) -> AssetQuery:
        if field_name not in ORDER_FIELDS:
            raise InvalidQuery(
                f"cannot order by {field_name!r:.40}; use one of {list(ORDER_FIELDS)}"
            )
        return self._with(order_field=field_name, ascending=bool(ascending))

    def limit(self, n: int) -> AssetQuery:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_LIMIT:
            raise InvalidQuery(f"limit must be an integer from 0 to {MAX_LIMIT}, got {n!r}")
        return self._with(limit_n=n)

    def offset(self, n: int) -> AssetQuery:
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InvalidQuery(f"offset must be a non-negative integer, got {n!r}")
        return self._with(offset_n=n)

    def include_expired(self) -> AssetQuery:
        return self._with(expired_too=True)

    @staticmethod
    def _time(when: object) -> datetime:
        if not isinstance(when, datetime):
            raise InvalidQuery(f"expected a datetime, got {type(when).__name__}")
        return when if when.tzinfo else when.replace(tzinfo=UTC)

    @staticmethod
    def _str(what: str, value: object) -> str:
        if not isinstance(value, str) or not value or len(value) > 1000:
            raise InvalidQuery(
                f"{what} must be a non-empty string (at most 1000 characters), got {value!r:.40}"
            )
        return value


def where_clause(db, q: AssetQuery) -> tuple[str, list]:
    """The WHERE condition of ``q`` in backend ``db``'s SQL, and its parameters."""
    clauses: list[str] = []
    params: list = []

    def add(sql: str, *values: Any) -> None:
        clauses.append(sql)
        params.extend(values)

    if q.asset_types:
        sql, values = db.in_list("asset_type", q.asset_types)
        add(sql, *values)
    if q.tags:
        sql, values = db.tags_filter(q.tags, q.tags_match_all)
        add(sql, *values)
    if q.properties:
        sql, values = db.properties_filter(dict(q.properties))
        add(sql, *values)
    for column, op, value in (
        ("created_at", ">", db.encode_time(q.after)),
        ("created_at", "<", db.encode_time(q.before)),
        ("parent_id", "=", q.parent_id),
        ("state", "=", q.state),
        ("checksum", "=", q.checksum),
        ("name", "=", q.name),
    ):
        if value is not None:
            add(f"{column} {op} %s", value)
    if q.text_search:
        sql, values = db.text_filter(q.text_search)
        add(sql, *values)
    if not q.expired_too:
        add("(expires_at IS NULL OR expires_at > %s)", db.now())
    return " AND ".join(clauses) or "TRUE", params


def search_sql(db, query: AssetQuery) -> tuple[str, list]:
    """The SELECT of ``query`` (metadata columns, ordered, paged) and its parameters."""
    where, params = where_clause(db, query)
    direction = "ASC" if query.ascending else "DESC"
    limit = query.limit_n if query.limit_n is not None else 2**62
    sql = (
        f"SELECT {META_SELECT} FROM assets WHERE {where}"
        f" ORDER BY {query.order_field} {direction} NULLS LAST, asset_id {direction}"
        " LIMIT %s OFFSET %s"
    )  # order_field is from the ORDER_FIELDS whitelist, checked when the query was built
    return sql, [*params, limit, query.offset_n]
