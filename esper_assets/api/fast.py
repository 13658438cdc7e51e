"""The hot route without the framework: ``GET /api/v1/kernels/{id}/binary`` for an id
the process's L1 holds is answered here, in front of Starlette (its middleware, router
and Request cost more than the whole L1 read, measured in ``esper bench serve``).

Only the plain case is taken: a GET of a valid id that L1 holds, answered 200, 206 or
304 by the same :func:`~esper_assets.api.binary.respond` the Starlette route uses. Any
other request, or one that would be an error (a bad id, an unsatisfiable Range), goes to
the Starlette app, so errors are still mapped in one place (errors.py).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from esper_assets.api.binary import respond
from esper_assets.errors import EsperError
from esper_assets.storage.repository.records import is_asset_id

PREFIX, SUFFIX = "/api/v1/kernels/", "/binary"
_CONDITIONAL = (b"if-none-match", b"if-range", b"range")


class FastBinary:
    """ASGI app: the L1 case of ``/binary`` itself, everything else to ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @property
    def state(self):
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = self._answer(scope) if scope["type"] == "http" else None
        if response is None:
            await self.app(scope, receive, send)
        else:
            await response(scope, receive, send)

    def _answer(self, scope: Scope):
        path: str = scope["path"]
        if scope["method"] != "GET" or not path.startswith(PREFIX) or not path.endswith(SUFFIX):
            return None
        kernel_id = path[len(PREFIX) : -len(SUFFIX)]
        services = getattr(self.app.state, "services", None)
        l1 = services.cache.tier("l1") if services is not None else None
        # L1 first: it holds only ids the cache validated, so a hit is a valid cache id
        # (a path with a "/" in the id is not: the router would not match it either).
        if l1 is None or kernel_id not in l1 or "/" in kernel_id or not is_asset_id(kernel_id):
            return None
        data = services.cache.get(kernel_id)
        if data is None:
            return None
        headers = {
            k.decode(): v.decode("latin-1") for k, v in scope["headers"] if k in _CONDITIONAL
        }
        try:
            return respond(kernel_id, data, services.etags.of(kernel_id, data), headers)
        except EsperError:  # 416: the Starlette route answers it, through errors.py
            return None
