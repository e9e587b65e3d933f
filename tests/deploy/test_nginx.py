"""docker-compose.yml's load balancer without a container engine: the repository's own nginx
configuration (deploy/nginx.conf) in front of two real ``modelgate serve`` replicas on their own
ports, sharing Postgres and Redis, with MODELGATE_TRUSTED_PROXIES naming nginx's address as
compose names nginx's. Through nginx: the client address reaches the limiter only as the
trusted-proxy setting allows, a rate limit and a revocation hold across the replicas, usage is
billed once, and stopping a replica under load fails no request."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from auth.identity.keys import generate_key
from tests.conftest import IRIS_SETOSA, Backend, only_on, recorded_units
from tests.deploy.stack import (
    NGINX,
    NGINX_INSTALLED,
    PROXY_ADDRESS,
    Nginx,
    Replica,
    nginx,
    nginx_directory,
    prepare_nginx,
    replica,
)
from tests.e2e.servers import run_cli, server_environment
from tests.e2e.test_edge_addresses import client, loopback, predict, token_address
from tests.parallel import quiet_from_here
from tests.promises import PromisedDelay

pytestmark = pytest.mark.e2e

if not NGINX_INSTALLED:
    # A failure under MODELGATE_TEST_REQUIRE_SERVICES=1 (.ci/run installs nginx).
    pytest.skip("nginx is not installed (apt-get install nginx)", allow_module_level=True)

PREDICT = "/api/v1/predict"
# Failed credentials one client address may present per minute (the throttle under test). Every
# client of this module comes from a loopback address of its own (loopback()): the failure count
# of an address is shared on Redis by every server of the run, and other tests' servers fail
# credentials from 127.0.0.1 with budgets of their own.
BUDGET = 5


def test_the_repository_nginx_configuration_is_valid() -> None:
    """``nginx -t`` accepts deploy/nginx.conf, as the tests render it."""
    with nginx_directory() as directory:
        _, command = prepare_nginx([8001, 8002], directory)
        checked = subprocess.run(
            [NGINX, *command[1:-2], "-t"], capture_output=True, text=True, check=False
        )
    assert checked.returncode == 0, checked.stderr


@dataclass
class Stack:
    """Two replicas behind nginx, an admin key and the environment they share."""

    environment: dict[str, str]
    cwd: Path
    replicas: tuple[Replica, Replica]
    proxy: Nginx
    admin: str

    def tenant(self, rate_limit: str) -> tuple[str, str]:
        """A new tenant with ``rate_limit`` and a key for it: (tenant id, key)."""
        tenant = json.loads(
            run_cli(
                self.environment,
                self.cwd,
                "tenants",
                "create",
                "--name",
                f"deploy-{uuid.uuid4().hex[:8]}",
                "--rate-limit",
                rate_limit,
            ).stdout
        )
        issued = run_cli(self.environment, self.cwd, "keys", "issue", "--tenant", tenant["id"])
        return tenant["id"], issued.stdout.strip().splitlines()[-1]

    def marks(self) -> tuple[int, int]:
        return self.replicas[0].log_lines(), self.replicas[1].log_lines()

    def answered(self, path: str, status: int, marks: tuple[int, int]) -> tuple[int, int]:
        """Per replica, the requests for ``path`` it answered with ``status`` since ``marks``."""
        first, second = self.replicas
        return first.answered(path, status, marks[0]), second.answered(path, status, marks[1])


def environment_for(backend: Backend, models: Path, var: Path) -> dict[str, str]:
    """Each replica's environment: the shared database and Redis, nginx as the trusted proxy."""
    return server_environment(
        backend.database_url,
        backend.redis_url,
        models,
        var,
        # Both replicas must share the secrets, as compose's replicas share theirs.
        MODELGATE_KEY_PEPPER="deploy-test-pepper-" + "p" * 32,
        MODELGATE_JWT_SECRET="deploy-test-jwt-secret-" + "j" * 32,
        MODELGATE_TRUSTED_PROXIES=PROXY_ADDRESS,
        MODELGATE_AUTH_FAILURES_PER_ADDRESS=f"{BUDGET}/minute",
        # INFO: each replica logs a line per request (with its pid).
        MODELGATE_LOG_LEVEL="INFO",
    )


@pytest.fixture(scope="module")
def stack_environment(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, str], Path]:
    """The replicas' environment and working directory (a fresh one, with no .env)."""
    cwd = tmp_path_factory.mktemp("deploy")
    models = cwd / "models"
    shutil.copytree(served_model_dir, models)
    environment = environment_for(backend, models, cwd / "var")
    run_cli(environment, cwd, "db", "upgrade")
    return environment, cwd


@pytest.fixture(scope="module")
def stack(stack_environment: tuple[dict[str, str], Path]) -> Iterator[Stack]:
    """Two replicas and nginx in front of them, for the module's tests that stop nothing."""
    environment, cwd = stack_environment
    admin = run_cli(environment, cwd, "admin", "create-key", "--name", "ops").stdout
    with ExitStack() as running:
        first = running.enter_context(replica(environment, cwd, cwd / "replica-1.log"))
        second = running.enter_context(replica(environment, cwd, cwd / "replica-2.log"))
        proxy = running.enter_context(nginx([first.port, second.port]))
        yield Stack(environment, cwd, (first, second), proxy, admin.strip().splitlines()[-1])


@only_on("postgres")
def test_through_nginx_only_the_client_address_nginx_saw_reaches_the_throttle(
    stack: Stack,
) -> None:
    """nginx overwrites X-Forwarded-For with the address it saw, and the replicas believe it
    because nginx is MODELGATE_TRUSTED_PROXIES: failed credentials with a new spoofed header each
    time all count against the client's real address, on both replicas (Redis); another client
    behind the same nginx is unaffected; the audit trail names the real address. A peer that is
    not nginx is not believed at all."""
    attacker, neighbour, audited = loopback(), loopback(), loopback()
    marks = stack.marks()
    with client(stack.proxy.port, attacker) as http:
        statuses = [predict(http, generate_key(), f"198.51.100.{i}") for i in range(BUDGET)]
        assert statuses == [401] * BUDGET
        assert predict(http, generate_key(), f"203.0.113.{BUDGET}") == 429
        # A live key that no replica has verified yet is refused too, before any lookup.
        _, key = stack.tenant("1000/minute")
        assert predict(http, key, "192.0.2.77") == 429
    # The failures were counted by both replicas: one count, shared.
    assert all(stack.answered(PREDICT, 401, marks)), stack.answered(PREDICT, 401, marks)
    with client(stack.proxy.port, neighbour) as http:
        # Had the replicas taken nginx's own address (or anything the attacker wrote) as the
        # client, this neighbour would be throttled with it.
        assert predict(http, generate_key(), attacker) == 401
        assert predict(http, key, attacker) == 200
    assert token_address(stack.proxy.port, audited, key, stack.admin, attacker) == audited
    # Straight to a replica, from a peer that is not nginx: its X-Forwarded-For is ignored (it
    # names the throttled attacker, yet this client is not throttled).
    direct = loopback()
    with client(stack.replicas[0].port, direct) as http:
        assert predict(http, generate_key(), attacker) == 401
    assert token_address(stack.replicas[1].port, direct, key, stack.admin, audited) == direct


@only_on("postgres")
def test_metrics_are_scraped_from_each_replica_and_not_served_through_nginx(stack: Stack) -> None:
    with httpx.Client(timeout=30) as http:
        assert http.get(f"{stack.proxy.url}/metrics").status_code == 404
        for served in stack.replicas:
            direct = http.get(f"http://127.0.0.1:{served.port}/metrics")
            assert direct.status_code == 200
            assert "modelgate_" in direct.text


async def _burst(url: str, key: str, count: int) -> list[int]:
    """``count`` concurrent predictions through ``url``, each claiming another origin."""
    async with httpx.AsyncClient(
        base_url=url, timeout=30, transport=httpx.AsyncHTTPTransport(local_address=loopback())
    ) as http:

        async def one(index: int) -> int:
            response = await http.post(
                PREDICT,
                json={"features": IRIS_SETOSA},
                headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": f"10.9.0.{index}"},
            )
            return response.status_code

        return await asyncio.gather(*[one(i) for i in range(count)])


@only_on("postgres")
def test_a_rate_limit_holds_across_replicas_and_usage_is_billed_once(stack: Stack) -> None:
    """A 20/minute key gets exactly 20 of 60 predictions through nginx, both replicas served
    some of them, and the units recorded equal the 2xx answers the client received."""
    tenant_id, key = stack.tenant("20/minute")
    marks = stack.marks()
    statuses: list[int] = []
    for _ in range(6):
        statuses += asyncio.run(_burst(stack.proxy.url, key, 10))
    assert sorted(statuses) == [200] * 20 + [429] * 40, statuses
    served = stack.answered(PREDICT, 200, marks)
    assert sum(served) == 20, served
    assert all(served), served
    assert all(stack.answered(PREDICT, 429, marks)), stack.answered(PREDICT, 429, marks)
    database_url = stack.environment["MODELGATE_DATABASE_URL"]
    assert asyncio.run(recorded_units(database_url, tenant_id)) == statuses.count(200)


@only_on("postgres")
def test_a_revocation_through_nginx_holds_on_both_replicas_within_a_second(stack: Stack) -> None:
    """A key cached by both replicas, revoked through nginx: both replicas refuse it within the
    promise (measured: tests.conftest.PromisedDelay), and from then on nothing is served."""
    tenant_id, _ = stack.tenant("1000/minute")
    admin = {"Authorization": f"Bearer {stack.admin}"}
    with httpx.Client(
        base_url=stack.proxy.url,
        timeout=30,
        transport=httpx.HTTPTransport(local_address=loopback()),
    ) as http:
        issued = http.post(
            f"/api/v1/admin/tenants/{tenant_id}/keys",
            json={"name": "revoked", "scopes": ["predict"]},
            headers=admin,
        )
        assert issued.status_code == 201, issued.text
        key, key_id = issued.json()["key"], issued.json()["id"]
        # Timed from the caching on: the key must still be cached when it is revoked.
        quiet_from_here()
        marks = stack.marks()
        for _ in range(6):
            assert predict_through(stack, key) == 200
        assert all(stack.answered(PREDICT, 200, marks)), "both replicas must have cached it"

        revoked = http.post(f"/api/v1/admin/keys/{key_id}/revoke", headers=admin)
        assert revoked.status_code == 200, revoked.text
    delay = PromisedDelay("revocation through nginx on both replicas", 1.0)
    marks = stack.marks()

    # Each from an address of its own: refusals count against the address's failure budget.
    def refused_by_both() -> bool:
        status = predict_through(stack, key)
        assert status in (200, 401), status
        return status == 401 and all(stack.answered(PREDICT, 401, marks))

    delay.until_sync(refused_by_both)
    # From then on nothing is served.
    assert [predict_through(stack, key) for _ in range(6)] == [401] * 6


def predict_through(stack: Stack, key: str) -> int:
    """One prediction through nginx from a client address of its own."""
    with client(stack.proxy.port, loopback()) as http:
        return predict(http, key)


@dataclass
class Load:
    """What the clients got: the statuses of their predictions and of their model listings,
    and the requests that got no answer at all."""

    predictions: list[int] = field(default_factory=list)
    listings: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def _load(url: str, key: str, stop: asyncio.Event, load: Load, clients: int) -> None:
    """Clients that each send predictions and model listings through nginx until ``stop``, a
    new connection for each request (so that nginx's reload closes none under them)."""

    async def one_client() -> None:
        async with httpx.AsyncClient(
            base_url=url,
            timeout=30,
            transport=httpx.AsyncHTTPTransport(
                local_address=loopback(), limits=httpx.Limits(max_keepalive_connections=0)
            ),
        ) as http:
            headers = {"Authorization": f"Bearer {key}"}
            while not stop.is_set():
                try:
                    response = await http.post(
                        PREDICT, json={"features": IRIS_SETOSA}, headers=headers
                    )
                    load.predictions.append(response.status_code)
                    listing = await http.get("/api/v1/models", headers=headers)
                    load.listings.append(listing.status_code)
                except httpx.HTTPError as exc:
                    load.failures.append(repr(exc))

    await asyncio.gather(*[one_client() for _ in range(clients)])


async def _until(
    condition: Callable[[], object], timeout: float, what: Callable[[], object]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.1)


@dataclass
class Stopped:
    """What a replica stopped under load left behind."""

    load: Load
    served: tuple[int, int]
    returncode: int
    recorded_units: int
    nginx_errors: list[str]


def _stop_a_replica_under_load(
    environment: dict[str, str], cwd: Path, take_out_first: bool
) -> Stopped:
    """Two replicas behind nginx, clients predicting through it; SIGTERM to the first replica
    (after taking it out of nginx's rotation if ``take_out_first``), and the clients go on
    until the other has served 20 more predictions."""
    tenant = json.loads(
        run_cli(
            environment,
            cwd,
            "tenants",
            "create",
            "--name",
            f"drained-{uuid.uuid4().hex[:8]}",
            "--rate-limit",
            "1000000/minute",
        ).stdout
    )
    issued = run_cli(environment, cwd, "keys", "issue", "--tenant", tenant["id"])
    key = issued.stdout.strip().splitlines()[-1]
    load = Load()
    tag = uuid.uuid4().hex[:6]
    with (
        replica(environment, cwd, cwd / f"stop-{tag}-1.log") as first,
        replica(environment, cwd, cwd / f"stop-{tag}-2.log") as second,
        nginx([first.port, second.port]) as proxy,
    ):

        async def scenario() -> None:
            stop = asyncio.Event()
            driving = asyncio.create_task(_load(proxy.url, key, stop, load, clients=8))

            def so_far() -> object:
                statuses = sorted(set(load.predictions))
                errors = proxy.error_log.read_text().splitlines()[-5:]
                return ("both replicas must serve first", statuses, load.failures[-3:], errors)

            await _until(
                lambda: first.answered(PREDICT, 200) and second.answered(PREDICT, 200),
                60,
                so_far,
            )
            await asyncio.sleep(1.0)
            if take_out_first:
                proxy.take_out(first.port)
                await _until(
                    lambda: "reconfiguring" in proxy.error_log.read_text(), 10, lambda: "reload"
                )
                # Until the replica has had nothing new to answer for a second.
                seen = -1
                while (now := first.log_lines()) != seen:
                    seen = now
                    await asyncio.sleep(1.0)
            first.terminate()
            await _until(lambda: first.process.poll() is not None, 90, lambda: "replica stop")
            served_before = second.answered(PREDICT, 200)
            await _until(
                lambda: second.answered(PREDICT, 200) > served_before + 20,
                60,
                lambda: ("the remaining replica must go on serving", so_far()),
            )
            stop.set()
            await driving

        asyncio.run(scenario())
        served = first.answered(PREDICT, 200), second.answered(PREDICT, 200)
        errors = [line for line in proxy.error_log.read_text().splitlines() if "[error]" in line]
    recorded = asyncio.run(recorded_units(environment["MODELGATE_DATABASE_URL"], tenant["id"]))
    returncode = first.process.returncode
    assert returncode is not None
    return Stopped(load, served, returncode, recorded, errors)


@only_on("postgres")
def test_a_replica_taken_out_of_nginx_then_stopped_under_load_fails_no_request(
    stack_environment: tuple[dict[str, str], Path],
) -> None:
    """The zero-downtime way to stop a replica: out of nginx's rotation (``down`` and a reload),
    then SIGTERM while clients predict through nginx. Every request is answered 200, both
    replicas served, the stopped one exited on its own, and every 2xx is billed once."""
    stopped = _stop_a_replica_under_load(*stack_environment, take_out_first=True)
    load = stopped.load
    assert load.failures == [], (load.failures[:10], stopped.nginx_errors)
    assert set(load.predictions) == {200}, (sorted(set(load.predictions)), stopped.nginx_errors)
    assert set(load.listings) == {200}, (sorted(set(load.listings)), stopped.nginx_errors)
    assert all(stopped.served), stopped.served
    assert sum(stopped.served) == len(load.predictions), stopped.served
    # uvicorn re-raises the signal once it has shut down gracefully.
    assert stopped.returncode in (0, -signal.SIGTERM), stopped.returncode
    assert stopped.recorded_units == len(load.predictions)


@only_on("postgres")
def test_a_replica_stopped_under_load_without_warning_costs_only_unsent_predictions(
    stack_environment: tuple[dict[str, str], Path],
) -> None:
    """SIGTERM to a replica nginx still sends to: nginx passes every refused connection and
    every failed GET to the other replica, so no GET fails and no request goes unanswered.
    A prediction whose connection the stopping replica reset after accepting it (the race of
    closing a listening socket) is answered 502, never retried, and never billed: the units
    recorded equal the 200s exactly (docs/operations.md: Deploying, "Stopping a replica")."""
    stopped = _stop_a_replica_under_load(*stack_environment, take_out_first=False)
    load = stopped.load
    assert load.failures == [], (load.failures[:10], stopped.nginx_errors)
    assert set(load.listings) == {200}, (sorted(set(load.listings)), stopped.nginx_errors)
    assert set(load.predictions) <= {200, 502}, sorted(set(load.predictions))
    assert load.predictions.count(200) > 0
    assert all(stopped.served), stopped.served
    assert sum(stopped.served) == load.predictions.count(200), stopped.served
    assert stopped.returncode in (0, -signal.SIGTERM), stopped.returncode
    assert stopped.recorded_units == load.predictions.count(200)
