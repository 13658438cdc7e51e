"""Bearer tokens for the mutating routes.

The token is ``Settings.api_token`` (``ESPER_API_TOKEN``, read only by settings.py).
Without one configured, mutating routes are refused (403), never open; a missing or
wrong token is a 401. The comparison is ``hmac.compare_digest``; neither the expected
nor the presented token appears in a message or a log line.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from esper_assets.api.errors import ApiError


def require_token(request: Request, expected: str | None) -> None:
    """Return if ``request`` carries ``Authorization: Bearer <expected>``; else ApiError."""
    if not expected:
        raise ApiError(
            403, "mutations_disabled",
            "mutating routes are off on this server: start it with ESPER_API_TOKEN set",
        )  # fmt: skip
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ApiError(401, "unauthorized", "send Authorization: Bearer <ESPER_API_TOKEN>")
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "the bearer token is not this server's token")
