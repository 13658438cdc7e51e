"""Query parameters -> the library's own checks, each error naming its field.

``/kernels/search`` builds an :class:`~esper_assets.storage.AssetQuery` (the checks
are the repository's: InvalidQuery becomes a 400 naming the parameter). Unknown
parameters are refused too, so a typo is not silently ignored. Page sizes are bounded
by :data:`MAX_PAGE`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.datastructures import QueryParams

from esper_assets.api.errors import ApiError
from esper_assets.errors import InvalidInput
from esper_assets.storage import AssetQuery
from esper_assets.storage.cache.config import check_kernel_id
from esper_assets.storage.repository.records import check_id

DEFAULT_PAGE, MAX_PAGE, MAX_OFFSET = 50, 500, 1_000_000
SEARCH_PARAMS = (
    "tag",
    "tags",
    "match",
    "blueprint",
    "state",
    "limit",
    "offset",
    "order",
    "direction",
)


def checked(field: str, step: Callable[[], Any]) -> Any:
    """``step()``, its InvalidInput turned into a 400 about ``field``."""
    try:
        return step()
    except InvalidInput as exc:
        raise ApiError(400, "invalid_parameter", f"{field}: {exc}", field) from None


def kernel_id(value: str) -> str:
    """An id path segment, checked by the cache's and the repository's rules."""
    checked("id", lambda: check_id("asset_id", check_kernel_id(value)))
    return value


def integer(params: QueryParams, name: str, default: int, high: int) -> int:
    text = params.get(name)
    if text is None:
        return default
    if not text.isdigit() or int(text) > high:
        raise ApiError(400, "invalid_parameter",
                       f"{name} must be an integer from 0 to {high}, got {text[:40]!r}", name)  # fmt: skip
    return int(text)


def search_query(params: QueryParams) -> AssetQuery:
    """The AssetQuery of ``/kernels/search``'s parameters (kernels only)."""
    unknown = sorted(set(params.keys()) - set(SEARCH_PARAMS))
    if unknown:
        raise ApiError(400, "unknown_parameter",
                       f"unknown parameter {unknown[0][:40]!r}; use {list(SEARCH_PARAMS)}", unknown[0])  # fmt: skip
    q = AssetQuery().with_type("kernel")
    tags = params.getlist("tag") + [t for v in params.getlist("tags") for t in v.split(",") if t]
    if tags:
        match = params.get("match", "all")
        q = checked("tags" if "tags" in params else "tag", lambda: q.with_tags(tags, match))
    elif "match" in params:
        q = checked("match", lambda: q.with_tags([], params["match"]))
    if "blueprint" in params:
        q = checked("blueprint", lambda: q.with_name(params["blueprint"]))
    if "state" in params:
        q = checked("state", lambda: q.with_state(params["state"]))
    direction = params.get("direction", "asc")
    if direction not in ("asc", "desc"):
        raise ApiError(
            400,
            "invalid_parameter",
            f"direction must be asc or desc, got {direction[:20]!r}",
            "direction",
        )
    q = checked("order", lambda: q.order_by(params.get("order", "created_at"), direction == "asc"))
    q = q.limit(integer(params, "limit", DEFAULT_PAGE, MAX_PAGE))
    return q.offset(integer(params, "offset", 0, MAX_OFFSET))
