"""What a verified payload asks for: MLflow's registry events, and the generic announcement.

MLflow (``model_version.created``, ``model_version_alias.created``): a registered model is
served under its own name, or the one ``MODELGATE_MLFLOW_MODEL_NAMES`` maps it to, and under
its own version number; a name that is neither mapped nor a valid modelgate name is refused.
A new version is deployed and not activated; the alias ``MODELGATE_MLFLOW_ACTIVATE_ALIAS``
(``champion``) moved to a version deploys it if needed and activates it. Every other event, and
every other alias, is accepted and ignored (202, ``"status": "ignored"``): a webhook subscribed
to more events than these is not an error.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from api.schemas.webhooks import (
    GenericDelivery,
    MlflowAliasCreated,
    MlflowDelivery,
    MlflowVersionCreated,
)
from api.webhooks.deploy import DeployRequest
from api.webhooks.receiver import Decision, Interpreter, WebhookPayloadInvalid, parse_payload
from auth.model_activation import MODEL_NAME_PATTERN
from auth.settings import Settings

VERSION_CREATED = ("model_version", "created")
ALIAS_CREATED = ("model_version_alias", "created")


def served_name(mlflow_name: str, names: dict[str, str]) -> str:
    """The name modelgate serves an MLflow registered model under (422 if it has none)."""
    mapped = names.get(mlflow_name)
    if mapped is not None:
        return mapped
    if re.fullmatch(MODEL_NAME_PATTERN, mlflow_name):
        return mlflow_name
    raise WebhookPayloadInvalid(
        "the MLflow model's name is not a valid modelgate model name (letters, digits, _ and -, "
        "at most 64) and MODELGATE_MLFLOW_MODEL_NAMES does not map it",
        reason="unmapped-name",
    )


def mlflow_interpreter(settings: Settings) -> Interpreter:
    """The interpreter of MLflow's deliveries under ``settings``' mapping and alias."""
    names = dict(settings.mlflow_model_names)
    alias = settings.mlflow_activate_alias

    def interpret(body: bytes, delivery_id: str) -> Decision:
        envelope = parse_payload(MlflowDelivery, body)
        event = (envelope.entity, envelope.action)
        if event == VERSION_CREATED:
            created = MlflowVersionCreated.model_validate(envelope.data)
            mlflow_name, version, activate = created.name, created.version, False
        elif event == ALIAS_CREATED:
            moved = MlflowAliasCreated.model_validate(envelope.data)
            if moved.alias != alias:
                return Decision(None, f"alias {moved.alias[:64]!r} is not {alias!r}: ignored")
            mlflow_name, version, activate = moved.name, moved.version, True
        else:
            return Decision(None, f"event {'.'.join(event)[:130]} deploys nothing: ignored")
        name = served_name(mlflow_name, names)
        request = DeployRequest(
            name=name,
            version=version,
            source_uri=f"models:/{mlflow_name}/{version}",
            activate=activate,
            delivery_id=delivery_id,
            via="mlflow",
        )
        what = "deploy and activate" if activate else "deploy (not activate)"
        return Decision(request, f"{what} version {version}", name, version)

    def interpret_checked(body: bytes, delivery_id: str) -> Decision:
        try:
            return interpret(body, delivery_id)
        except ValidationError:
            raise WebhookPayloadInvalid(
                "the MLflow event's data is not what this webhook expects"
            ) from None

    return interpret_checked


def interpret_generic(body: bytes, delivery_id: str) -> Decision:
    """The generic announcement: deploy ``name`` at ``version`` from ``source``, and activate
    it if asked."""
    payload = parse_payload(GenericDelivery, body)
    request = DeployRequest(
        name=payload.name,
        version=payload.version,
        source_uri=payload.source,
        activate=payload.activate,
        delivery_id=delivery_id,
        via="generic",
        sha256=payload.sha256,
    )
    what = "deploy and activate" if payload.activate else "deploy (not activate)"
    return Decision(request, f"{what} version {payload.version}", payload.name, payload.version)
