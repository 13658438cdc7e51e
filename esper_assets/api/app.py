"""The Starlette application: routes, error handlers, and the storage objects it
serves from, opened by ``flows.wiring`` when the server starts and closed when it stops."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from esper_assets.api import metrics, routes
from esper_assets.api.errors import HANDLERS
from esper_assets.api.fast import FastBinary
from esper_assets.api.openapi import document
from esper_assets.flows import wiring
from esper_assets.settings import Settings

PREFIX = "/api/v1"
SUBSCRIBE_WAIT_S = 5.0  # at startup, for L2's invalidation listener (see lifespan)
log = logging.getLogger(__name__)


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(document())


ROUTES = [
    Route("/healthz", routes.healthz),
    Route("/readyz", routes.readyz),
    Route("/metrics", routes.prometheus),
    Route(f"{PREFIX}/openapi.json", openapi),
    Route(f"{PREFIX}/kernels/search", routes.search),
    Route(f"{PREFIX}/kernels/{{id}}", routes.kernel),
    Route(f"{PREFIX}/kernels/{{id}}/binary", routes.binary),
    Route(f"{PREFIX}/cache/stats", routes.stats),
    Route(f"{PREFIX}/cache/optimize", routes.optimize, methods=["POST"]),
]


def create_app(settings: Settings) -> FastBinary:
    """The API over the cache and repository ``settings`` configure (built by the wiring
    when the server starts, closed when it stops): the Starlette app behind
    :class:`FastBinary`, which answers ``/binary`` for ids in L1 itself."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        with ExitStack() as stack:
            store = wiring.object_store(settings)
            exporter = metrics.Exporter()
            cache = stack.enter_context(wiring.open_cache(settings, store, exporter.tap))
            # With L2, other processes' invalidations reach L1 only once the listener is
            # subscribed, and its first subscription drops L1 (filled unheard); the
            # cache waits up to ~1 s for it. Answer only after it: on a loaded machine
            # it can come later, after the first reads, emptying L1 under them (their
            # ids loaded again). Redis down: served (degraded) after this wait.
            listens = cache.tier("l1") is not None and cache.tier("l2") is not None
            if listens and not cache.wait_subscribed(SUBSCRIBE_WAIT_S):
                log.warning("L2's invalidations not subscribed after %.0f s; serving, and L1 "
                            "is dropped once they are", SUBSCRIBE_WAIT_S)  # fmt: skip
            repo = stack.enter_context(wiring.open_repository(settings, store, exporter.tap))
            app.state.services = routes.Services(settings, cache, repo)
            fast.serve_from(app.state.services)
            stack.callback(fast.serve_from, None)  # before the cache closes
            app.state.metrics = exporter
            exporter.start(cache, repo, settings)  # settings: the landing zone's backlog
            stack.callback(exporter.stop)  # before the cache closes: its last counts too
            # What startup built lives as long as the server: out of the collector's
            # sight, a full collection does not walk every module and class object again
            # (no clear effect in esper bench serve on this machine; cheap, kept).
            gc.collect()
            gc.freeze()
            yield

    fast = FastBinary(Starlette(routes=ROUTES, exception_handlers=HANDLERS, lifespan=lifespan))
    return fast


def app_from_env() -> FastBinary:
    """``create_app(Settings.from_env())``: the factory ``esper serve`` gives uvicorn, so
    each worker process reads the environment and opens its own connections."""
    return create_app(Settings.from_env())
