"""Who may call: the API key check in front of /v1, /metrics and /ui, as plain ASGI middleware.

Plain ASGI rather than an ``@app.middleware("http")`` function: Starlette's ``BaseHTTPMiddleware``
wraps every ``receive`` of the request in a task group that it cancels again, so each request left
~1,000 objects in reference cycles (tasks, cancelled errors, tracebacks, frames holding the request)
for Python's cyclic collector to find later.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from .errors import APIError

PROTECTED = ("/v1", "/metrics", "/ui")
COOKIE = "unimedvl_key"


def authorised(conn: HTTPConnection, key: str) -> bool:
    """A bearer token or ``X-API-Key`` header equal to ``key``; on /ui also the cookie or ``?key=``."""
    header = conn.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else conn.headers.get("x-api-key", "")
    if not given and conn.url.path.startswith("/ui"):
        given = conn.cookies.get(COOKIE) or conn.query_params.get("key", "")
    return bool(given) and hmac.compare_digest(given.encode(), key.encode())


class ApiKeyGuard:
    """Refuses protected paths without the key (401); a browser opening ``/ui?key=KEY`` gets the key
    as an HTTP-only cookie, so the UI's own requests carry it."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.api_key:
            return await self.app(scope, receive, send)
        conn = HTTPConnection(scope)
        path = conn.url.path
        if path.startswith(PROTECTED) and not authorised(conn, self.api_key):
            refusal = JSONResponse(APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                            code="invalid_api_key").body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await refusal(scope, receive, send)
        if not (path.startswith("/ui") and conn.query_params.get("key") == self.api_key):
            return await self.app(scope, receive, send)
        cookie = Response()
        cookie.set_cookie(COOKIE, self.api_key, httponly=True, samesite="strict")
        set_cookie = [h for h in cookie.raw_headers if h[0] == b"set-cookie"]

        async def send_with_cookie(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *set_cookie]}
            await send(message)

        return await self.app(scope, receive, send_with_cookie)
