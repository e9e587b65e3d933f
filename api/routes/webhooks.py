"""Signed webhooks that announce new model versions (MLflow's own, and Standard Webhooks).

Under ``/admin/models/webhooks`` but not behind the admin router's credential: each delivery is
authenticated by its signature under a shared secret (``api.webhooks.receiver``), and the route
answers 404 while that secret is unset."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.http.deps import app_state
from api.http.errors import problem_responses
from api.schemas.webhooks import GenericDelivery, WebhookAccepted
from api.webhooks.events import interpret_generic, mlflow_interpreter
from api.webhooks.receiver import receive
from auth.webhooks.signatures import verify_mlflow, verify_standard

router = APIRouter(prefix="/admin/models/webhooks", tags=["webhooks"])

_RESPONSES = problem_responses(401, 404, 409, 413, 422, 429, 503)


def _body(schema: dict[str, Any], headers: tuple[str, ...]) -> dict[str, Any]:
    """The OpenAPI request body and signature headers of a route that reads its body raw (its
    signature is over the exact bytes)."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
        "parameters": [
            {"name": header, "in": "header", "required": True, "schema": {"type": "string"}}
            for header in headers
        ],
    }


_MLFLOW_BODY = _body(
    {
        "type": "object",
        "required": ["entity", "action", "data"],
        "properties": {
            "entity": {"type": "string", "examples": ["model_version_alias"]},
            "action": {"type": "string", "examples": ["created"]},
            "timestamp": {"type": "string"},
            "data": {"type": "object"},
        },
    },
    ("X-MLflow-Delivery-Id", "X-MLflow-Timestamp", "X-MLflow-Signature"),
)
_GENERIC_BODY = _body(
    GenericDelivery.model_json_schema(), ("webhook-id", "webhook-timestamp", "webhook-signature")
)


@router.post(
    "/mlflow",
    status_code=202,
    response_model=WebhookAccepted,
    responses=_RESPONSES,
    openapi_extra=_MLFLOW_BODY,
)
async def mlflow_webhook(request: Request) -> WebhookAccepted:
    """Accept MLflow's signed registry webhook: a new model version, or the activation alias."""
    state = app_state(request)
    secret = state.settings.mlflow_webhook_secret
    return await receive(
        request,
        "mlflow",
        secret.get_secret_value() if secret is not None else None,
        verify_mlflow,
        mlflow_interpreter(state.settings),
    )


@router.post(
    "/generic",
    status_code=202,
    response_model=WebhookAccepted,
    responses=_RESPONSES,
    openapi_extra=_GENERIC_BODY,
)
async def generic_webhook(request: Request) -> WebhookAccepted:
    """Accept a Standard Webhooks-signed announcement of a new model version."""
    secret = app_state(request).settings.webhook_secret
    return await receive(
        request,
        "generic",
        secret.get_secret_value() if secret is not None else None,
        verify_standard,
        interpret_generic,
    )
