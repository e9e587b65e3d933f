"""Verifying a signed webhook delivery before its body is believed.

Two schemes, the same idea: an HMAC-SHA256 over ``<delivery id>.<timestamp>.<body>`` under a
shared secret, base64, versioned ``v1,<signature>``.

- MLflow's own model-registry webhooks (MLflow 3.3 and later; ``mlflow/webhooks/delivery.py``):
  ``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature``,
  keyed by the secret given to ``MlflowClient().create_webhook(secret=...)`` as UTF-8 bytes.
- Standard Webhooks (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), keyed by the
  base64 after ``whsec_``: verified by the ``standardwebhooks`` library, never by hand.

The headers and the timestamp are checked before the body is read; a timestamp more than
``MAX_SKEW_SECONDS`` from this server's clock, either way, is refused, and so a captured delivery
cannot be replayed later than that (within it, the delivery id is accepted once:
``auth.webhooks.deliveries``). Comparisons are constant-time (``hmac.compare_digest``). No
error names the secret, the expected signature or the body.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from auth.errors import Unauthenticated

# Clock skew allowed either way between the sender's timestamp and ours.
MAX_SKEW_SECONDS = 300

WebhookSource = Literal["mlflow", "generic"]

# A delivery id: MLflow sends a UUID, Standard Webhooks senders ids such as "msg_2Lh...".
_DELIVERY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Unix seconds, as both schemes send them (no sign, no fraction, no exponent).
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
# A signature header: one or a few space-separated "v1,<base64>" (a sender rotating its secret
# sends one per secret).
_SIGNATURE_HEADER_LENGTH = 1024

MLFLOW_HEADERS = ("x-mlflow-delivery-id", "x-mlflow-timestamp", "x-mlflow-signature")
STANDARD_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")


class WebhookRefused(Unauthenticated):
    """A delivery that does not prove who sent it; ``reason`` is the audit trail's word for it."""

    type = "webhook-signature-invalid"
    title = "Webhook signature invalid"
    reason = "bad-signature"


class WebhookHeadersMissing(WebhookRefused):
    """A signature header is missing, empty or malformed."""

    type = "webhook-headers-invalid"
    title = "Webhook headers missing or invalid"
    reason = "missing-headers"


class WebhookTimestampStale(WebhookRefused):
    """The signed timestamp is more than the allowed skew from this server's clock."""

    type = "webhook-timestamp-stale"
    title = "Webhook timestamp outside the allowed window"
    reason = "stale-timestamp"


@dataclass(frozen=True, slots=True)
class SignedHeaders:
    """A delivery's id, timestamp (as sent and as a number) and signature header."""

    delivery_id: str
    timestamp_text: str
    timestamp: int
    signature: str = ""

    def __repr__(self) -> str:
        # The signature is not a secret, but there is no reason to log it either.
        return f"SignedHeaders(delivery_id={self.delivery_id!r}, timestamp={self.timestamp})"


def signed_headers(headers: Mapping[str, str], source: WebhookSource) -> SignedHeaders:
    """The delivery's signature headers, each present and well-formed (else
    :class:`WebhookHeadersMissing`)."""
    id_header, timestamp_header, signature_header = (
        MLFLOW_HEADERS if source == "mlflow" else STANDARD_HEADERS
    )
    delivery_id = headers.get(id_header, "")
    timestamp = headers.get(timestamp_header, "")
    signature = headers.get(signature_header, "")
    if not (delivery_id and timestamp and signature):
        raise WebhookHeadersMissing(
            f"a signed delivery carries {id_header}, {timestamp_header} and {signature_header}"
        )
    if not _DELIVERY_ID.fullmatch(delivery_id):
        raise WebhookHeadersMissing(f"{id_header} must be 1 to 128 letters, digits, . _ : or -")
    if not _TIMESTAMP.fullmatch(timestamp):
        raise WebhookHeadersMissing(f"{timestamp_header} must be Unix seconds")
    if len(signature) > _SIGNATURE_HEADER_LENGTH:
        raise WebhookHeadersMissing(f"{signature_header} is too long")
    return SignedHeaders(delivery_id, timestamp, int(timestamp), signature)


def check_timestamp(signed: SignedHeaders, now: float) -> None:
    """Refuse a timestamp more than ``MAX_SKEW_SECONDS`` before or after ``now``."""
    if abs(signed.timestamp - now) > MAX_SKEW_SECONDS:
        raise WebhookTimestampStale(
            f"the delivery's timestamp is more than {MAX_SKEW_SECONDS} seconds from this "
            "server's clock (a replay, or a clock to fix)"
        )


def verify_mlflow(secret: str, signed: SignedHeaders, body: bytes) -> None:
    """Check MLflow's ``v1,<base64 HMAC-SHA256>`` over ``<id>.<timestamp>.<body>`` (the body's
    bytes as received: MLflow signs the very string it sends), constant-time; else
    :class:`WebhookRefused`."""
    content = f"{signed.delivery_id}.{signed.timestamp_text}.".encode() + body
    expected = base64.b64encode(hmac.new(secret.encode("utf-8"), content, hashlib.sha256).digest())
    matched = False
    for candidate in signed.signature.split(" "):
        version, _, value = candidate.partition(",")
        # Every candidate is compared (no early exit): the time taken says nothing about which.
        matched |= version == "v1" and hmac.compare_digest(value.encode(), expected)
    if not matched:
        raise WebhookRefused("the delivery's signature does not match")


def verify_standard(secret: str, signed: SignedHeaders, body: bytes) -> None:
    """Check a Standard Webhooks signature with the ``standardwebhooks`` library (which also
    checks the timestamp, as ``check_timestamp`` did before the body was read); else
    :class:`WebhookRefused`."""
    headers = {
        "webhook-id": signed.delivery_id,
        "webhook-timestamp": signed.timestamp_text,
        "webhook-signature": signed.signature,
    }
    try:
        Webhook(secret).verify(body, headers, json_parse=False)
    except WebhookVerificationError:
        raise WebhookRefused("the delivery's signature does not match") from None
