"""Outgoing events (issue 22): endpoints and their secrets, the outbox written with its cause,
signed delivery to a real receiver, retries and the delivery log, and the address guard. Every
test runs on Postgres and on the embedded default."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import select, text
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from api.events.dispatcher import Dispatcher
from auth.events.endpoints import TargetPolicy, create_endpoint
from auth.events.expiry import sweep_key_expiry
from auth.events.secrets import new_secret
from auth.events.targets import TargetRefused, resolve_target
from auth.identity.keys import revoke_key
from auth.models import Event, utcnow
from tests.conftest import (
    IRIS_SETOSA,
    TEST_ACTOR,
    Backend,
    Harness,
    bearer,
    create_admin_key,
    create_tenant_with_key,
    make_settings,
    running_app,
    unique,
)
from tests.events.receiver import Receiver, running_receiver

WEBHOOK_SCOPES = ("predict", "usage:read", "keys:manage", "webhooks:manage")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def harness(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Harness]:
    """The app with loopback targets allowed (the receiver is on 127.0.0.1), a fast retry
    schedule and a short failure window. Every app on the module's database must share these:
    any of them may deliver any event."""
    settings = make_settings(
        backend,
        served_model_dir,
        tmp_path_factory.mktemp("var"),
        webhook_allow_private_targets=True,
        event_retry_schedule_seconds=",".join(["0.1"] * 19),
        event_dispatch_interval_seconds=0.05,
        # An endpoint failing for half a second is disabled (a day in production).
        event_disable_after_seconds=0.5,
    )
    async with running_app(settings, backend) as running:
        yield running


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as running:
        yield running


async def register(
    harness: Harness, key: str, url: str, events: list[str], prefix: str = "/api/v1/me/webhooks"
) -> dict[str, Any]:
    response = await harness.client.post(
        prefix, json={"url": url, "events": events, "description": "test"}, headers=bearer(key)
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def received(receiver: Receiver, count: int) -> list[Any]:
    return await asyncio.to_thread(receiver.wait_for, count)


def verified(secret: str, request: Any) -> dict[str, Any]:
    """The body, verified with the standardwebhooks library as any receiver would."""
    body: dict[str, Any] = Webhook(secret).verify(request.body, request.headers)
    return body


async def test_secret_is_shown_once_and_signs_every_delivery(
    harness: Harness, receiver: Receiver
) -> None:
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    endpoint = await register(harness, key, receiver.url, ["webhook.test"])
    secret = endpoint["secret"]
    assert secret.startswith("whsec_")
    listed = await harness.client.get("/api/v1/me/webhooks", headers=bearer(key))
    shown = await harness.client.get(f"/api/v1/me/webhooks/{endpoint['id']}", headers=bearer(key))
    assert secret not in listed.text
    assert secret not in shown.text
    assert "secret" not in shown.json()

    queued = await harness.client.post(
        f"/api/v1/me/webhooks/{endpoint['id']}/test", headers=bearer(key)
    )
    assert queued.status_code == 202, queued.text
    (request,) = await received(receiver, 1)
    body = verified(secret, request)
    assert body["type"] == "webhook.test"
    assert set(body) == {"type", "timestamp", "data"}
    assert request.headers["webhook-id"] == queued.json()["event_id"]
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(request.body, request.headers)


async def test_rotated_secret_and_previous_both_sign_during_grace(
    harness: Harness, receiver: Receiver
) -> None:
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    endpoint = await register(harness, key, receiver.url, ["webhook.test"])
    rotated = await harness.client.post(
        f"/api/v1/me/webhooks/{endpoint['id']}/rotate-secret",
        json={"grace_seconds": 3600},
        headers=bearer(key),
    )
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["secret"] != endpoint["secret"]
    await harness.client.post(f"/api/v1/me/webhooks/{endpoint['id']}/test", headers=bearer(key))
    (request,) = await received(receiver, 1)
    verified(endpoint["secret"], request)
    verified(rotated.json()["secret"], request)


async def test_failing_receiver_gets_the_same_event_id_until_it_answers(
    harness: Harness, receiver: Receiver
) -> None:
    receiver.script = [500, 500, 200]
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    endpoint = await register(harness, key, receiver.url, ["webhook.test"])
    await harness.client.post(f"/api/v1/me/webhooks/{endpoint['id']}/test", headers=bearer(key))
    requests = await received(receiver, 3)
    assert len({r.headers["webhook-id"] for r in requests}) == 1
    for request in requests:
        verified(endpoint["secret"], request)
    log: list[dict[str, Any]] = []
    for _ in range(100):
        response = await harness.client.get(
            f"/api/v1/me/webhooks/{endpoint['id']}/deliveries", headers=bearer(key)
        )
        log = response.json()["attempts"]
        if len(log) == 3:
            break
        await asyncio.sleep(0.05)
    assert [a["status_code"] for a in reversed(log)] == [500, 500, 200]
    assert [a["outcome"] for a in reversed(log)] == ["http_error", "http_error", "delivered"]
    # The first bytes of the answer only.
    assert all(len(a["response_excerpt"]) <= 1024 for a in log)
    assert log[-1]["response_excerpt"].startswith("receiver says no")


async def test_a_manual_redelivery_sends_the_same_event_again_to_its_owner_only(
    harness: Harness, receiver: Receiver
) -> None:
    """A delivery sent again by hand carries the same event id and body, signed; the log shows
    both attempts; another tenant's credential cannot send it (404, as for a missing one)."""
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    _, stranger = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    endpoint = await register(harness, key, receiver.url, ["webhook.test"])
    base = f"/api/v1/me/webhooks/{endpoint['id']}"
    await harness.client.post(f"{base}/test", headers=bearer(key))
    (first,) = await received(receiver, 1)
    attempts: list[dict[str, Any]] = []
    for _ in range(100):
        attempts = (await harness.client.get(f"{base}/deliveries", headers=bearer(key))).json()[
            "attempts"
        ]
        if attempts:
            break
        await asyncio.sleep(0.05)
    delivery = attempts[0]["delivery_id"]
    refused = await harness.client.post(
        f"{base}/deliveries/{delivery}/redeliver", headers=bearer(stranger)
    )
    assert refused.status_code == 404, refused.text
    queued = await harness.client.post(
        f"{base}/deliveries/{delivery}/redeliver", headers=bearer(key)
    )
    assert queued.status_code == 202, queued.text
    assert queued.json() == {"delivery_id": delivery}
    first_again, second = await received(receiver, 2)
    assert first_again is first
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert verified(endpoint["secret"], second) == verified(endpoint["secret"], first)
    for _ in range(100):
        attempts = (await harness.client.get(f"{base}/deliveries", headers=bearer(key))).json()[
            "attempts"
        ]
        if len(attempts) == 2:
            break
        await asyncio.sleep(0.05)
    assert [a["outcome"] for a in attempts] == ["delivered", "delivered"]
    assert {a["delivery_id"] for a in attempts} == {delivery}


async def test_thresholds_and_exhaustion_are_each_sent_once(
    harness: Harness, receiver: Receiver
) -> None:
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES, monthly_quota=10)
    endpoint = await register(harness, key, receiver.url, ["usage.threshold", "quota.exhausted"])
    answers = await asyncio.gather(
        *(
            harness.client.post(
                "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
            )
            for _ in range(16)
        )
    )
    assert sorted(a.status_code for a in answers) == [200] * 10 + [429] * 6
    requests = await received(receiver, 5)
    await asyncio.sleep(0.3)  # nothing more arrives
    bodies = [verified(endpoint["secret"], r) for r in receiver.snapshot()]
    thresholds = sorted(b["data"]["threshold"] for b in bodies if b["type"] == "usage.threshold")
    assert thresholds == [50, 80, 90, 100]
    assert [b["type"] for b in bodies].count("quota.exhausted") == 1
    assert len(requests) == len(bodies) == 5
    usage = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert usage.json()["thresholds_crossed"] == [50, 80, 90, 100]


async def test_revoke_rotate_suspend_and_activate_each_send_their_event_once(
    harness: Harness, receiver: Receiver
) -> None:
    tenant, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    admin = await create_admin_key(harness)
    endpoint = await register(
        harness, key, receiver.url, ["key.revoked", "key.rotated", "tenant.suspended"]
    )
    _, other = await create_tenant_with_key(harness)  # another tenant: not this endpoint's
    operator = await register(
        harness, admin, receiver.url + "/operator", ["model.activated"], "/api/v1/admin/webhooks"
    )
    issued = await harness.client.post(
        "/api/v1/me/keys", json={"name": "spare", "scopes": ["predict"]}, headers=bearer(key)
    )
    spare = issued.json()["id"]
    revoked = await harness.client.post(f"/api/v1/me/keys/{spare}/revoke", headers=bearer(key))
    assert revoked.status_code == 200, revoked.text
    again = await harness.client.post(f"/api/v1/me/keys/{spare}/revoke", headers=bearer(key))
    assert again.status_code == 200
    issued = await harness.client.post(
        "/api/v1/me/keys", json={"name": "rotating", "scopes": ["predict"]}, headers=bearer(key)
    )
    rotating = issued.json()["id"]
    rotated = await harness.client.post(
        f"/api/v1/admin/keys/{rotating}/rotate", json={"grace_seconds": 0}, headers=bearer(admin)
    )
    assert rotated.status_code == 201, rotated.text
    activated = await harness.client.post(
        "/api/v1/admin/models/iris/activate", json={"version": "1"}, headers=bearer(admin)
    )
    assert activated.status_code == 200, activated.text
    suspended = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant.id}", json={"status": "suspended"}, headers=bearer(admin)
    )
    assert suspended.status_code == 200, suspended.text
    revoked_other = await harness.client.post(
        "/api/v1/me/keys", json={"name": "x"}, headers=bearer(other)
    )
    assert revoked_other.status_code == 403  # no keys:manage; nothing happens
    requests = await received(receiver, 4)
    await asyncio.sleep(0.3)
    requests = receiver.snapshot()
    tenant_bodies = [verified(endpoint["secret"], r) for r in requests if r.path == "/hook"]
    operator_bodies = [
        verified(operator["secret"], r) for r in requests if r.path == "/hook/operator"
    ]
    assert sorted(b["type"] for b in tenant_bodies) == [
        "key.revoked",
        "key.rotated",
        "tenant.suspended",
    ]
    assert [b["type"] for b in operator_bodies] == ["model.activated"]
    assert {b["data"]["key_id"] for b in tenant_bodies if b["type"] != "tenant.suspended"} == {
        spare,
        rotating,
    }
    # Never a key or a secret in an event (a key's display prefix is not the key).
    new_key = rotated.json()["key"]
    for request in requests:
        assert key.encode() not in request.body
        assert new_key.encode() not in request.body
        assert b"whsec_" not in request.body


async def test_another_tenants_endpoint_is_not_found(harness: Harness, receiver: Receiver) -> None:
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    _, other = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    endpoint = await register(harness, key, receiver.url, ["webhook.test"])
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/test"), ("GET", "/deliveries")):
        response = await harness.client.request(
            method, f"/api/v1/me/webhooks/{endpoint['id']}{suffix}", headers=bearer(other)
        )
        assert response.status_code == 404, (method, suffix, response.text)
    _, plain = await create_tenant_with_key(harness)
    response = await harness.client.get("/api/v1/me/webhooks", headers=bearer(plain))
    assert response.status_code == 403


async def test_a_redirect_is_not_followed(harness: Harness, receiver: Receiver) -> None:
    receiver.script = ["http://169.254.169.254/latest/meta-data/"]
    _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    endpoint = await register(harness, key, receiver.url, ["webhook.test"])
    await harness.client.post(f"/api/v1/me/webhooks/{endpoint['id']}/test", headers=bearer(key))
    await received(receiver, 1)
    log: list[dict[str, Any]] = []
    for _ in range(100):
        response = await harness.client.get(
            f"/api/v1/me/webhooks/{endpoint['id']}/deliveries", headers=bearer(key)
        )
        log = response.json()["attempts"]
        if log:
            break
        await asyncio.sleep(0.05)
    assert log[-1]["status_code"] == 302
    assert log[-1]["outcome"] == "http_error"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://localhost/hook",
        "http://224.0.0.1/hook",
    ],
)
async def test_private_targets_are_refused_without_the_setting(url: str) -> None:
    with pytest.raises(TargetRefused):
        await resolve_target(url, allow_private=False, production=False)
    # https is required in production whatever the address.
    with pytest.raises(TargetRefused):
        await resolve_target("http://example.com/hook", allow_private=True, production=True)


async def test_registration_refuses_a_private_url_without_the_setting(harness: Harness) -> None:
    # The service the routes and the CLI call, with the setting off (the module's app has it on;
    # a second app on this database would deliver the module's events under other settings).
    tenant, _ = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    policy = TargetPolicy(allow_private=False, production=False)
    for url in ("http://127.0.0.1:9/hook", "http://169.254.169.254/", "http://localhost/x"):
        async with harness.sessionmaker() as session:
            with pytest.raises(TargetRefused) as refused:
                await create_endpoint(
                    session,
                    harness.state.event_secrets,
                    TEST_ACTOR,
                    policy,
                    tenant_id=tenant.id,
                    url=url,
                    events=["webhook.test"],
                )
        assert refused.value.status_code == 422


async def test_an_event_exists_only_if_its_cause_committed(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    issued = await harness.client.post(
        "/api/v1/me/keys", json={"name": "doomed", "scopes": ["predict"]}, headers=bearer(key)
    )
    key_id = uuid.UUID(issued.json()["id"])
    async with harness.sessionmaker() as session:
        await revoke_key(session, TEST_ACTOR, key_id)
        await session.rollback()
    async with harness.sessionmaker() as session:
        payloads = (
            await session.scalars(select(Event.payload).where(Event.tenant_id == tenant.id))
        ).all()
    assert not [p for p in payloads if json.loads(p)["type"] == "key.revoked"]


async def test_a_flush_that_fails_writes_no_event(harness: Harness) -> None:
    """A real failure inside the usage writer's transaction (a trigger refuses the records,
    after the counter moved and the threshold events were added): 503, and no event."""
    tenant, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES, monthly_quota=2)
    postgres = harness.backend.name == "postgres"
    create = (
        [
            "CREATE FUNCTION refuse_usage() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'refused by the test'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_usage BEFORE INSERT ON usage_record "
            "FOR EACH ROW EXECUTE FUNCTION refuse_usage()",
        ]
        if postgres
        else [
            "CREATE TRIGGER refuse_usage BEFORE INSERT ON usage_record "
            "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ]
    )
    drop = (
        ["DROP TRIGGER refuse_usage ON usage_record", "DROP FUNCTION refuse_usage()"]
        if postgres
        else ["DROP TRIGGER refuse_usage"]
    )
    async with harness.sessionmaker() as session:
        for statement in create:
            await session.execute(text(statement))
        await session.commit()
    try:
        response = await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
    finally:
        async with harness.sessionmaker() as session:
            for statement in drop:
                await session.execute(text(statement))
            await session.commit()
    assert response.status_code == 503, response.text
    async with harness.sessionmaker() as session:
        events = (await session.scalars(select(Event).where(Event.tenant_id == tenant.id))).all()
    assert events == []
    # The same request once the database accepts it: 50 % of a quota of 2, one event.
    served = await harness.client.post(
        "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
    )
    assert served.status_code == 200
    async with harness.sessionmaker() as session:
        types = (
            await session.scalars(select(Event.type).where(Event.tenant_id == tenant.id))
        ).all()
    assert types == ["usage.threshold"]


async def test_a_tenants_own_thresholds_override_its_plans(harness: Harness) -> None:
    admin = await create_admin_key(harness)
    plan = await harness.client.post(
        "/api/v1/admin/plans",
        json={"name": unique("alerts"), "monthly_quota": 4, "usage_alert_thresholds": [75]},
        headers=bearer(admin),
    )
    assert plan.status_code == 201, plan.text
    assert plan.json()["usage_alert_thresholds"] == [75]
    tenant, key = await create_tenant_with_key(
        harness, scopes=WEBHOOK_SCOPES, plan=plan.json()["name"]
    )
    changed = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant.id}",
        json={"usage_alert_thresholds": [50, 25, 50]},
        headers=bearer(admin),
    )
    assert changed.status_code == 200, changed.text
    refused = await harness.client.patch(
        f"/api/v1/admin/tenants/{tenant.id}",
        json={"usage_alert_thresholds": [0]},
        headers=bearer(admin),
    )
    assert refused.status_code == 422
    # The key has not been used yet: its first request reads the tenant as it is now.
    for _ in range(3):
        served = await harness.client.post(
            "/api/v1/predict", json={"features": IRIS_SETOSA}, headers=bearer(key)
        )
        assert served.status_code == 200
    async with harness.sessionmaker() as session:
        payloads = (
            await session.scalars(select(Event.payload).where(Event.tenant_id == tenant.id))
        ).all()
    assert sorted(json.loads(p)["data"]["threshold"] for p in payloads) == [25, 50]
    usage = await harness.client.get("/api/v1/me/usage", headers=bearer(key))
    assert usage.json()["thresholds_crossed"] == [25, 50]


async def test_key_expiry_notices_are_queued_once_each(harness: Harness) -> None:
    tenant, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
    soon = await harness.client.post(
        "/api/v1/me/keys",
        json={"name": "soon", "scopes": ["predict"], "expires_at": _in(days=5)},
        headers=bearer(key),
    )
    tomorrow = await harness.client.post(
        "/api/v1/me/keys",
        json={"name": "tomorrow", "scopes": ["predict"], "expires_at": _in(hours=20)},
        headers=bearer(key),
    )
    later = await harness.client.post(
        "/api/v1/me/keys",
        json={"name": "later", "scopes": ["predict"], "expires_at": _in(days=30)},
        headers=bearer(key),
    )
    assert {soon.status_code, tomorrow.status_code, later.status_code} == {201}, soon.text
    for _ in range(2):  # two sweeps (two workers, or one worker twice): each notice once
        async with harness.sessionmaker() as session:
            await sweep_key_expiry(session)
            await session.commit()
    async with harness.sessionmaker() as session:
        payloads = (
            await session.scalars(
                select(Event.payload).where(
                    Event.tenant_id == tenant.id, Event.type == "key.expiring"
                )
            )
        ).all()
    data = [json.loads(p)["data"] for p in payloads]
    notices = sorted((d["name"], d["days_before"]) for d in data)
    assert notices == [("soon", 7), ("tomorrow", 1)]


def _in(**delta: float) -> str:
    return (utcnow() + timedelta(**delta)).isoformat()


async def test_an_endpoint_failing_for_its_whole_window_is_disabled_and_the_operator_told(
    harness: Harness,
) -> None:
    with running_receiver() as failing, running_receiver() as operator_receiver:
        failing.script = [500] * 1000
        _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
        admin = await create_admin_key(harness)
        operator = await register(
            harness, admin, operator_receiver.url, ["endpoint.disabled"], "/api/v1/admin/webhooks"
        )
        endpoint = await register(harness, key, failing.url, ["webhook.test"])
        await harness.client.post(f"/api/v1/me/webhooks/{endpoint['id']}/test", headers=bearer(key))
        (told,) = await received(operator_receiver, 1)
        shown = await harness.client.get(
            f"/api/v1/me/webhooks/{endpoint['id']}", headers=bearer(key)
        )
        attempts = len(failing.snapshot())
        # The operator's endpoint is for this test alone.
        await harness.client.delete(
            f"/api/v1/admin/webhooks/{operator['id']}", headers=bearer(admin)
        )
    body = verified(operator["secret"], told)
    assert body["type"] == "endpoint.disabled"
    assert body["data"]["endpoint_id"] == endpoint["id"]
    assert shown.json()["status"] == "disabled"
    assert shown.json()["disabled_reason"].startswith("every delivery failed since")
    assert attempts >= 3


async def test_a_slow_endpoint_does_not_delay_another(harness: Harness, receiver: Receiver) -> None:
    with running_receiver() as slow:
        slow.script = [3.0] * 4
        _, key = await create_tenant_with_key(harness, scopes=WEBHOOK_SCOPES)
        slow_endpoint = await register(harness, key, slow.url, ["webhook.test"])
        fast_endpoint = await register(harness, key, receiver.url, ["webhook.test"])
        for _ in range(4):
            await harness.client.post(
                f"/api/v1/me/webhooks/{slow_endpoint['id']}/test", headers=bearer(key)
            )
        await asyncio.to_thread(slow.wait_for, 2)  # the slow endpoint's share is busy
        started = asyncio.get_running_loop().time()
        await harness.client.post(
            f"/api/v1/me/webhooks/{fast_endpoint['id']}/test", headers=bearer(key)
        )
        await received(receiver, 1)
        elapsed = asyncio.get_running_loop().time() - started
        # Answered while the slow endpoint's first deliveries still wait for their answers.
        assert elapsed < 2.0, elapsed
        assert len(slow.snapshot()) == 2  # at most its share at once (MAX_PER_ENDPOINT)
        await asyncio.to_thread(slow.wait_for, 4)


async def test_each_delivery_checks_its_target_again(harness: Harness, receiver: Receiver) -> None:
    """An endpoint registered while its name resolved publicly and resolving privately by the
    time of delivery (DNS rebinding) is refused then, and nothing reaches the address."""
    strict = harness.state.settings.model_copy(update={"webhook_allow_private_targets": False})
    dispatcher = Dispatcher(harness.sessionmaker, harness.state.event_secrets, strict)
    try:
        outcome, status, excerpt, _ = await dispatcher._send(
            receiver.url, str(uuid.uuid4()), '{"type":"webhook.test"}', [new_secret()]
        )
    finally:
        await dispatcher.close()
    assert (outcome, status) == ("refused", None)
    assert "non-public" in excerpt
    assert receiver.snapshot() == []
