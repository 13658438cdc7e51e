"""``esper serve``: an HTTP API (Starlette on uvicorn) over the storage library.

- ``app``: :func:`create_app` (routes, error handlers, the cache and repository opened
  by ``flows.wiring`` for the server's lifetime) and ``app_from_env`` (uvicorn's factory)
- ``routes``: the handlers; ``query``: parameters checked by the library's own rules
- ``binary``: ETag, If-None-Match, Range and the chunked body of ``/binary``
- ``auth``: the bearer token of mutating routes (``ESPER_API_TOKEN``)
- ``errors``: EsperError subclasses -> status codes, JSON error bodies (one place)
- ``openapi``: the OpenAPI document (``/api/v1/openapi.json``)
- ``metrics``: ``/metrics`` (prometheus-client, multiprocess): the ``Exporter`` of the
  cache's counters and read latencies, and the ``Records`` collector of the work of
  other processes, derived from their durable records at scrape time
- ``fast``: ``FastBinary``, ``/binary`` for ids in L1 in front of the router

May import: ``errors``, ``settings``, ``storage``, ``flows``. Nothing here imports
``defs``, ``runner`` or ``cli``.
"""

from esper_assets.api.app import app_from_env, create_app

__all__ = ["app_from_env", "create_app"]
