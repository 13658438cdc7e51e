"""The OpenAPI 3.1 document of the API, served at ``/api/v1/openapi.json``."""

from __future__ import annotations

from typing import Any

from esper_assets.api.query import DEFAULT_PAGE, MAX_OFFSET, MAX_PAGE

_ERROR = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
_JSON = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "maxLength": 255}}


def _param(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in codes}


_SEARCH = [
    _param("tag", {"type": "string"}, "a tag; repeat for several"),
    _param("tags", {"type": "string"}, "tags, comma-separated"),
    _param("match", {"enum": ["all", "any"]}, "whether every tag or any tag must match"),
    _param("blueprint", {"type": "string"}, "the blueprint name the kernel was compiled from"),
    _param("state", {"enum": ["active", "deprecated", "archived"]}, "lifecycle state"),
    _param(
        "limit",
        {"type": "integer", "minimum": 0, "maximum": MAX_PAGE, "default": DEFAULT_PAGE},
        "page size",
    ),
    _param(
        "offset",
        {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET, "default": 0},
        "page start",
    ),
    _param("order", {"type": "string", "default": "created_at"}, "AssetQuery order field"),
    _param("direction", {"enum": ["asc", "desc"], "default": "asc"}, "sort direction"),
]

_BINARY = {
    "summary": "the kernel's bytes (ETag = sha256 checksum; If-None-Match -> 304; one bytes Range -> 206)",
    "parameters": [_ID, {"name": "Range", "in": "header", "schema": {"type": "string"}},
                   {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
    "responses": {"200": {"description": "the bytes", "content": {"application/octet-stream": {}}},
                  "206": {"description": "the range asked for"}, "304": {"description": "not modified"},
                  **_errors(400, 404, 416, 503)},
}  # fmt: skip

_OPTIMIZE = {
    "summary": "remove expired entries from every tier, then warm the most used kernels",
    "security": [{"bearer": []}],
    "requestBody": {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "properties": {"top": {"type": "integer", "minimum": 0, "maximum": 10000}},
        "additionalProperties": False}}}},
    "responses": {"200": _JSON, **_errors(400, 401, 403, 413, 503)},
}  # fmt: skip


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "esper_assets", "version": "1"},
        "paths": {
            "/healthz": {"get": {"summary": "the process is alive", "responses": {"200": _JSON}}},
            "/readyz": {"get": {"summary": "per-tier status; 503 when no durable tier answers",
                                "responses": {"200": _JSON, "503": _JSON}}},
            "/api/v1/kernels/search": {"get": {"summary": "search kernels (AssetQuery)",
                                               "parameters": _SEARCH, "responses": {"200": _JSON, **_errors(400, 503)}}},
            "/api/v1/kernels/{id}": {"get": {"summary": "a kernel's metadata and lineage", "parameters": [
                _ID, _param("depth", {"type": "integer", "minimum": 1, "maximum": 100, "default": 5}, "lineage depth")],
                "responses": {"200": _JSON, **_errors(400, 404, 503)}}},
            "/api/v1/kernels/{id}/binary": {"get": _BINARY},
            "/api/v1/cache/stats": {"get": {"summary": "cache statistics per tier", "responses": {"200": _JSON}}},
            "/api/v1/cache/optimize": {"post": _OPTIMIZE},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                "status": {"type": "integer"}, "code": {"type": "string"}, "message": {"type": "string"},
                "field": {"type": "string"}}}}}},
        },
    }  # fmt: skip
