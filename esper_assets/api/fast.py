"""The hot route without the framework: ``GET /api/v1/kernels/{id}/binary`` for an id
the process's L1 holds is answered here, in front of Starlette (its middleware, router
and Request cost more than the whole L1 read, measured in ``esper bench serve``).

Only the plain case is taken: a GET of a valid id that L1 holds, answered 200, 206 or
304 by the same :func:`~esper_assets.api.binary.respond` the Starlette route uses. Any
other request, or one that would be an error (a bad id, an unsatisfiable Range), goes to
the Starlette app, so errors are still mapped in one place (errors.py).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from esper_assets.api.binary import ETags, respond
from esper_assets.errors import EsperError

PREFIX, SUFFIX = "/api/v1/kernels/", "/binary"
_CONDITIONAL = (b"if-none-match", b"if-range", b"range")


class FastBinary:
    """ASGI app: the L1 case of ``/binary`` itself, everything else to ``app``.

    It answers only while :meth:`serve_from` has given it the app's services (the app's
    lifespan does, once the cache is open, and takes them back before it closes), so a
    request reads one attribute here instead of Starlette's ``State`` (a Python-level
    ``__getattr__``) and the cache's tier lookup. Calls are what this path costs: in the
    server each Python call on it costs 1.5-2 us of CPU (paired runs on one server,
    ``esper bench serve``'s load), ten times what a loop of them measures.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._source: tuple[Any, Any, ETags] | None = None  # cache, its L1, the ETag memo

    @property
    def state(self):
        return self.app.state

    def serve_from(self, services: Any) -> None:
        """Answer from ``services`` (routes.Services) from now on; None: stop answering."""
        if services is None:
            self._source = None
        else:
            self._source = (services.cache, services.cache.tier("l1"), services.etags)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self._answer(scope) if scope["type"] == "http" else None
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def _answer(self, scope: Scope):
        source = self._source
        path: str = scope["path"]
        if (
            source is None
            or scope["method"] != "GET"
            or not path.startswith(PREFIX)
            or not path.endswith(SUFFIX)
        ):
            return None
        cache, l1, etags = source
        kernel_id = path[len(PREFIX) : -len(SUFFIX)]
        # L1 holds only ids the cache validated, whose rules are an asset id's (a test
        # holds them equal), so a hit needs no other check; but an id with a "/" is not
        # one the router would match.
        if l1 is None or kernel_id not in l1 or "/" in kernel_id:
            return None
        data = cache.get(kernel_id)
        if data is None:
            return None
        headers = {}
        for name, value in scope["headers"]:
            if name in _CONDITIONAL:
                headers[name.decode()] = value.decode("latin-1")
        try:
            return respond(kernel_id, data, etags.of(kernel_id, data), headers)
        except EsperError:  # 416: the Starlette route answers it, through errors.py
            return None
