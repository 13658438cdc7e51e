"""The route handlers: each parses its input (query.py), calls the storage library in
a worker thread (its calls block) and returns JSON or the kernel's bytes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from esper_assets.api import metrics, query
from esper_assets.api.auth import require_token
from esper_assets.api.binary import ETags, respond
from esper_assets.api.errors import ApiError
from esper_assets.errors import AssetNotFound, EsperError, StorageError
from esper_assets.settings import Settings
from esper_assets.storage import AssetMetadata, AssetQuery, AssetRepository, PersistentKernelCache

MAX_BODY = 4096
DURABLE = ("l3", "l4", "repository")  # tiers that can serve a kernel L1/L2 do not hold


@dataclass
class Services:
    settings: Settings
    cache: PersistentKernelCache
    repo: AssetRepository
    etags: ETags = field(default_factory=ETags)


def services(request: Request) -> Services:
    return request.app.state.services


def public(meta: AssetMetadata) -> dict[str, Any]:
    doc = meta.as_dict()
    doc.pop("object_key", None)
    return doc


def summary(meta: AssetMetadata) -> dict[str, Any]:
    return {"asset_id": meta.asset_id, "asset_type": meta.asset_type, "name": meta.name,
            "version": meta.version, "state": meta.state}  # fmt: skip


async def healthz(request: Request) -> JSONResponse:
    return JSONResponse({"status": "alive"})


def _readiness(s: Services) -> dict[str, Any]:
    tiers: dict[str, Any] = dict(s.cache.health())
    try:
        s.repo.search_assets(AssetQuery().limit(1))
        tiers["repository"] = {"status": "healthy"}
    except EsperError as exc:
        tiers["repository"] = {"status": "unavailable", "error": str(exc)}
    up = {name for name, t in tiers.items() if t["status"] == "healthy"}
    status = "ready" if up == set(tiers) else "degraded" if up & set(DURABLE) else "unavailable"
    return {"status": status, "down": sorted(set(tiers) - up), "tiers": tiers}


async def readyz(request: Request) -> JSONResponse:
    report = await run_in_threadpool(_readiness, services(request))
    return JSONResponse(report, status_code=503 if report["status"] == "unavailable" else 200)


async def prometheus(request: Request) -> Response:
    """Every worker's metrics in the Prometheus text format (see metrics.py)."""
    exporter = getattr(request.app.state, "metrics", None)
    body, content_type = await run_in_threadpool(metrics.exposition, exporter)
    return Response(body, media_type=content_type)


async def search(request: Request) -> JSONResponse:
    q = query.search_query(request.query_params)
    found = await run_in_threadpool(services(request).repo.search_assets, q)
    full = len(found) == q.limit_n
    return JSONResponse({
        "items": [public(m) for m in found], "limit": q.limit_n, "offset": q.offset_n,
        "next_offset": q.offset_n + len(found) if full else None,
    })  # fmt: skip


def _kernel_meta(repo: AssetRepository, kernel_id: str) -> AssetMetadata:
    meta = repo.get_metadata(kernel_id)
    if meta.asset_type != "kernel":
        raise AssetNotFound(f"no kernel {kernel_id!r} (that id is a {meta.asset_type})")
    return meta


def _kernel_document(repo: AssetRepository, kernel_id: str, depth: int) -> dict[str, Any]:
    meta = _kernel_meta(repo, kernel_id)
    tree = repo.get_lineage(kernel_id, depth)
    lineage = {
        "depth": depth,
        "parent": summary(tree["parent"]) if tree["parent"] else None,
        **{k: [summary(m) for m in tree[k]] for k in ("children", "ancestors", "descendants")},
    }
    return {"kernel": public(meta), "lineage": lineage}


async def kernel(request: Request) -> JSONResponse:
    kernel_id = query.kernel_id(request.path_params["id"])
    unknown = sorted(set(request.query_params.keys()) - {"depth"})
    if unknown:
        raise ApiError(
            400,
            "unknown_parameter",
            f"unknown parameter {unknown[0][:40]!r}; use ['depth']",
            unknown[0],
        )
    depth = query.integer(request.query_params, "depth", 5, 100) or 1
    doc = await run_in_threadpool(_kernel_document, services(request).repo, kernel_id, depth)
    return JSONResponse(doc)


def _kernel_bytes(s: Services, kernel_id: str) -> bytes:
    """From the cache (L1 -> L2 -> L3 -> L4), else from the repository's registered kernel."""
    data = s.cache.get(kernel_id)
    if data is not None:
        return data
    try:
        meta, data = s.repo.get_asset(kernel_id)
    except StorageError as exc:
        raise StorageError(f"kernel {kernel_id!r} is in no cache tier, and {exc}") from None
    if meta.asset_type != "kernel":
        raise AssetNotFound(f"no kernel {kernel_id!r} (that id is a {meta.asset_type})")
    return data


async def binary(request: Request):
    kernel_id = query.kernel_id(request.path_params["id"])
    s = services(request)
    # An id L1 holds is read on the event loop (a dict lookup, through the public get,
    # so access counts and stats see it); anything else may wait on a lower tier, so a
    # worker thread reads it. (An entry expiring between the two lookups makes that one
    # read block the loop; it is rare and bounded by the tiers' own timeouts.)
    l1 = s.cache.tier("l1")
    data = s.cache.get(kernel_id) if l1 is not None and kernel_id in l1 else None
    if data is None:
        data = await run_in_threadpool(_kernel_bytes, s, kernel_id)
    return respond(kernel_id, data, s.etags.of(kernel_id, data), request.headers)


async def stats(request: Request) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(services(request).cache.get_stats, True))


async def _small_json(request: Request) -> dict[str, Any]:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            raise ApiError(413, "body_too_large", f"the request body is over {MAX_BODY} bytes")
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except ValueError:
        raise ApiError(400, "invalid_body", "the request body is not JSON", "body") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "invalid_body", "the request body must be a JSON object", "body")
    return doc


def _optimize(cache: PersistentKernelCache, top: int) -> dict[str, Any]:
    removed = cache.cleanup()
    warmed = cache.warm_cache(cache.hottest(top)) if top else {}
    loaded = sum(1 for tier in warmed.values() if tier != "missing")
    return {"removed": removed, "warmed": loaded, "asked": len(warmed), "from": warmed}


async def optimize(request: Request) -> JSONResponse:
    s = services(request)
    require_token(request, s.settings.api_token)
    doc = await _small_json(request)
    unknown = sorted(set(doc) - {"top"})
    if unknown:
        raise ApiError(
            400, "unknown_field", f"unknown field {unknown[0][:40]!r}; use ['top']", unknown[0]
        )
    top = doc.get("top", 100)
    if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 10_000:
        raise ApiError(
            400, "invalid_field", f"top must be an integer from 0 to 10000, got {top!r:.40}", "top"
        )
    return JSONResponse(await run_in_threadpool(_optimize, s.cache, top))
