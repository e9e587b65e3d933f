"""SECURITY.md line 20: logs never contain a credential, a digest or a request body."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
import structlog

from api.observability.logging import configure_logging
from auth.identity.keys import generate_key, key_digest
from tests.conftest import Harness, bearer, create_admin_key, create_tenant_with_key, wrong_checksum


def _app_formatter() -> logging.Formatter:
    """The formatter of the handler the app installed
    (``api.observability.logging.configure_logging``), so that the test reads each line as the app
    writes it, not only the record behind it."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter):
            return handler.formatter
    raise AssertionError("the app's log handler is not installed on the root logger")


def _request_lines(records: list[logging.LogRecord]) -> dict[str, dict[str, object]]:
    """The app's own request log lines (logger ``modelgate.request``, event "request"), by
    request id."""
    lines = {}
    for record in records:
        event = record.msg
        is_dict = isinstance(event, dict)
        if record.name == "modelgate.request" and is_dict and event.get("event") == "request":
            lines[str(event["request_id"])] = event
    return lines


async def test_logs_carry_no_key_digest_or_body(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    tenant, key = await create_tenant_with_key(harness)
    admin = await create_admin_key(harness)
    unknown = generate_key()  # well formed: it is looked up in the database, by its digest
    forged = wrong_checksum(key)  # wrong checksum
    marker = [5.123456789, 3.987654321, 1.4, 0.2]
    pepper = harness.state.secrets.key_pepper
    predict = "/api/v1/predict"
    # The app logs at WARNING in the tests (make_settings): lower the root logger to DEBUG for
    # the block, so that every logger the app does not pin emits everything it would ever log.
    with caplog.at_level(logging.DEBUG):
        responses: list[tuple[httpx.Response, str, int]] = [
            (
                await harness.client.post(predict, json={"features": marker}, headers=bearer(key)),
                predict,
                200,
            ),
            (
                await harness.client.post(predict, json={"features": [1.0]}, headers=bearer(key)),
                predict,
                422,
            ),
            (
                await harness.client.post(
                    predict, json={"features": marker}, headers=bearer(forged)
                ),
                predict,
                401,
            ),
            (
                await harness.client.post(
                    predict, json={"features": marker}, headers=bearer(unknown)
                ),
                predict,
                401,
            ),
            (
                await harness.client.post(
                    "/api/v1/predict/batch",
                    json={"instances": [marker, marker]},
                    headers=bearer(key),
                ),
                "/api/v1/predict/batch",
                200,
            ),
        ]
        keys_path = f"/api/v1/admin/tenants/{tenant.id}/keys"
        issued = await harness.client.post(keys_path, json={"name": "new"}, headers=bearer(admin))
        # The route's template, not the path with the tenant's id in it.
        responses.append((issued, "/api/v1/admin/tenants/{tenant_id}/keys", 201))
        exchanged = await harness.client.post(
            "/api/v1/auth/token",
            data={"grant_type": "client_credentials", "client_secret": key},
        )
        responses.append((exchanged, "/api/v1/auth/token", 200))
    new_key = issued.json()["key"]
    token = exchanged.json()["access_token"]

    # First, the app really logged each request (and not only httpx its own lines), so the
    # search below reads what the app writes.
    lines = _request_lines(caplog.records)
    for response, route, status in responses:
        assert response.status_code == status, response.text
        line = lines.get(response.headers["X-Request-ID"])
        assert line is not None, f"no request log line for {route} {status}"
        assert (line["method"], line["route"], line["status"]) == ("POST", route, status)
        assert isinstance(line["duration_ms"], float)
        assert "path" not in line
    # Who made each request, by id: the tenant's key on its own predictions, nobody on the
    # refused ones, the operator's key (no tenant) on the key it issued.
    key_id = str((await harness.client.get("/api/v1/me", headers=bearer(key))).json()["key"]["id"])
    by_request = [lines[response.headers["X-Request-ID"]] for response, _, _ in responses]
    assert [(line["tenant_id"], line["key_id"]) for line in by_request[:2]] == [
        (str(tenant.id), key_id)
    ] * 2
    assert [(line["tenant_id"], line["key_id"]) for line in by_request[2:4]] == [(None, None)] * 2
    assert by_request[5]["tenant_id"] is None
    assert by_request[5]["key_id"] is not None
    # The key exchanged for a token, by the ids of the key (never the key or the token).
    assert (by_request[6]["tenant_id"], by_request[6]["key_id"]) == (str(tenant.id), key_id)
    formatter = _app_formatter()
    text = "\n".join(
        f"{formatter.format(record)} {record.getMessage()} {record.__dict__}"
        for record in caplog.records
    )
    for secret in (key, new_key, unknown, forged, admin, token):
        assert secret not in text
        assert secret[:-1] not in text  # nor most of it
        assert key_digest(pepper, secret) not in text
    assert "5.123456789" not in text
    assert "3.987654321" not in text


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_each_log_format_writes_its_lines_and_no_local_of_a_traceback(log_format: str) -> None:
    """MODELGATE_LOG_FORMAT: JSON lines, or structlog's console lines for development; either
    way a logged exception's traceback shows no frame's local variables (rich's console
    traceback, structlog's default when rich is installed, would print them)."""
    stream = io.StringIO()
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    secret = "mg_" + "s3cr3t" * 6

    def authenticate(credential: str) -> None:
        raise ValueError("bad credential")

    try:
        configure_logging("INFO", log_format, stream=stream)  # type: ignore[arg-type]
        structlog.get_logger("modelgate.request").info("request", route="/api/v1/predict")
        try:
            authenticate(secret)
        except ValueError:
            structlog.get_logger("modelgate.test").exception("authentication failed")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
    text = stream.getvalue()
    first = text.splitlines()[0]
    if log_format == "json":
        assert json.loads(first)["route"] == "/api/v1/predict"
    else:
        assert not first.startswith("{")
        assert "route=/api/v1/predict" in first
    assert "in authenticate" in text  # the traceback is there...
    assert secret not in text  # ...without the frame's locals
