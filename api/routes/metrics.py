"""``GET /metrics``: Prometheus' text format, public or behind ``MODELGATE_METRICS_TOKEN``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4

from api.http.deps import app_state
from api.http.errors import problem_responses
from api.observability import metrics
from auth.errors import Unauthenticated
from ml.observe import set_batch_observer, set_fetch_observer

router = APIRouter(tags=["service"])

_METRICS_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": "Every metric, in Prometheus' text exposition format 0.0.4",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    **problem_responses(401),
}
_METRICS_RESPONSES[401]["description"] = (
    "MODELGATE_METRICS_TOKEN is set and the request does not carry it as a bearer token"
)


@router.get("/metrics", response_class=Response, responses=_METRICS_RESPONSES)
async def scrape(request: Request) -> Response:
    """Report the service's metrics in Prometheus' text format (a bearer token if configured)."""
    token = app_state(request).settings.metrics_token
    if token is not None and not _carries(request, token.get_secret_value()):
        raise Unauthenticated("this route needs the metrics token as a bearer token")
    # With several workers the figures are read from their files: not in the event loop.
    body = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=CONTENT_TYPE_PLAIN_0_0_4)


def _carries(request: Request, token: str) -> bool:
    """Whether the request's ``Authorization: Bearer`` credential is ``token``; compared as
    digests in constant time, so neither the token's characters nor its length leak."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    given = hashlib.sha256(credential.strip().encode("utf-8", "surrogateescape")).digest()
    return hmac.compare_digest(given, hashlib.sha256(token.encode()).digest())


def install_metrics(app: FastAPI) -> None:
    """Serve ``GET /metrics`` and let ``ml`` report its inference batches and its fetches
    from the model store."""
    app.include_router(router)
    set_batch_observer(metrics.observe_batch)
    set_fetch_observer(metrics.observe_fetch)
