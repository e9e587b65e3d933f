"""The one builder of problem JSON responses (RFC 9457, ``application/problem+json``).

Every error answer is built by :func:`problem_response`: the exception handlers
(``api.http.errors``) return it, routes that answer a problem themselves (readiness, V2) return
it, and the pure ASGI middleware (the request-context middleware's 413, 500 and unbilled 503, the
deadline's 503) send it with ``await response(scope, receive, send)``. It imports nothing from the
middleware or the handlers, so that all of them can import it.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from starlette.types import Scope

from api.http.context import request_context

PROBLEM_MEDIA_TYPE = "application/problem+json"


def problem_response(
    scope: Scope,
    status: int,
    type_: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The problem JSON answer to the request of ``scope`` (``request.scope`` in a route): its
    body carries the request id, a 401 says ``WWW-Authenticate: Bearer``, a 429 or 503 says when
    to retry (``headers``' own ``Retry-After`` if given, else 1 second), and the request's context
    keeps the problem type for the count of refusals."""
    context = request_context(scope)
    body = {
        "type": type_,
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": context.request_id,
        **extra,
    }
    headers = dict(headers or {})
    if status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    elif status in (429, 503) and "Retry-After" not in headers:
        # Every refusal a client may retry says when (the error's own figure when it has one).
        headers["Retry-After"] = "1"
    context.problem_type = type_
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)
