"""The web console in a real browser: Debian's chromium, headless, driven by Playwright for Python,
against a real ``modelgate serve`` on each backend (one server and one browser for the module).

Every test runs with every request to another origin blocked and recorded, and fails if the page
made one, logged an error, threw, or opened a dialog it did not expect. axe-core, vendored with
this test, runs in the page on every view and must report no serious or critical violation. With
``MODELGATE_TEST_SCREENSHOTS=DIR`` the SQLite run saves the screenshots that docs/console.md shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import joblib
import numpy as np
import pytest
import skops.io as skops_io
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from tests.conftest import IRIS_SETOSA, Backend
from tests.e2e.servers import BIN, free_port, run_cli, serve, server_environment

pytestmark = pytest.mark.e2e

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = Path("/usr/bin/chromium")
AXE = Path(__file__).parent / "console" / "axe.min.js"
PASSWORD = "correct horse battery staple"
XSS_NAME = "<img src=x onerror=alert(1)>"
# How long a revoked credential may keep working: the contract's second, with room for a busy
# machine (tests/e2e/test_key_cache_workers.py holds the second itself).
REFUSED_WITHIN = 5.0
SCREENSHOTS = os.environ.get("MODELGATE_TEST_SCREENSHOTS")


@dataclass
class Server:
    """The module's server: its base URL, an operator's e-mail, and a tenant with a key."""

    url: str
    backend: str
    cwd: Path
    operator: str
    tenant_id: str
    tenant_key: str
    xss_key: str
    limited_key: str  # allowed 2 requests a minute

    def api(self, method: str, path: str, credential: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.url}/api/v1{path}",
            headers={"Authorization": f"Bearer {credential}"},
            timeout=30,
            **kwargs,
        )

    def refused_soon(self, credential: str, path: str = "/me") -> None:
        """``credential`` is refused (401 or 403) at ``path`` within REFUSED_WITHIN."""
        deadline = time.monotonic() + REFUSED_WITHIN
        while True:
            status = self.api("GET", path, credential).status_code
            if status in (401, 403):
                return
            assert status == 200, status
            assert time.monotonic() < deadline, f"{path} still answers 200"
            time.sleep(0.1)


def _register_second_iris(environment: dict[str, str], cwd: Path) -> None:
    """``iris`` version 2 (a logistic regression), for the operator to activate."""
    iris = load_iris()
    source = cwd / "candidate.joblib"
    joblib.dump(LogisticRegression(max_iter=1000).fit(iris.data, iris.target), source)
    reference = cwd / "iris.csv"
    np.savetxt(reference, iris.data, delimiter=",")
    run_cli(
        environment,
        cwd,
        *("models", "register", str(source), "--name", "iris", "--version", "2"),
        *("--reference", str(reference)),
    )
    # A third, in skops' format (no pickle), for the operator to pull from a file.
    skops_io.dump(LogisticRegression(max_iter=500).fit(iris.data, iris.target), cwd / "iris.skops")


def _tenant_with_key(url: str, admin_token: str, **fields: Any) -> tuple[str, str]:
    """A tenant created over the API, and a key with every tenant scope: (id, key)."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    tenant = httpx.post(f"{url}/api/v1/admin/tenants", json=fields, headers=headers, timeout=30)
    assert tenant.status_code == 201, tenant.text
    tenant_id = tenant.json()["id"]
    scopes = ["predict", "usage:read", "keys:manage", "webhooks:manage"]
    issued = httpx.post(
        f"{url}/api/v1/admin/tenants/{tenant_id}/keys",
        json={"name": "default", "scopes": scopes},
        headers=headers,
        timeout=30,
    )
    assert issued.status_code == 201, issued.text
    return tenant_id, issued.json()["key"]


@pytest.fixture(scope="module")
def server(
    backend: Backend, served_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One ``modelgate serve`` for the module, on the backend's fresh database."""
    cwd = tmp_path_factory.mktemp(f"console-{backend.name}")
    shutil.copytree(served_model_dir, cwd / "models")
    environment = server_environment(
        backend.database_url,
        backend.redis_url,
        cwd / "models",
        cwd / "var",
        MODELGATE_LOG_LEVEL="WARNING",
        # The tests present revoked credentials on purpose, from 127.0.0.1, on a Redis that
        # other tests share: no test may throttle another (tests/e2e/conftest.py says why).
        MODELGATE_AUTH_FAILURES_PER_ADDRESS="999999/minute",
        # A webhook endpoint on this machine, where nothing listens: its deliveries fail.
        MODELGATE_WEBHOOK_ALLOW_PRIVATE_TARGETS="true",
    )
    _register_second_iris(environment, cwd)
    operator = f"ops-{uuid.uuid4().hex[:8]}@example.com"
    subprocess.run(
        [str(BIN / "modelgate"), "admin", "create-user", "--email", operator],
        cwd=cwd,
        env=environment,
        input=PASSWORD + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    with serve(environment, cwd) as port:
        url = f"http://127.0.0.1:{port}"
        login = {"grant_type": "password", "username": operator, "password": PASSWORD}
        token = httpx.post(f"{url}/api/v1/auth/token", data=login, timeout=30)
        assert token.status_code == 200, token.text
        admin_token = token.json()["access_token"]
        # A quota of 10 units: the first test's 5 cross the 50 % alert threshold, and its 7 in
        # all stay within it.
        name = f"acme-{uuid.uuid4().hex[:6]}"
        tenant_id, tenant_key = _tenant_with_key(url, admin_token, name=name, monthly_quota=10)
        _, xss_key = _tenant_with_key(url, admin_token, name=XSS_NAME)
        _, limited_key = _tenant_with_key(
            url, admin_token, name=f"busy-{uuid.uuid4().hex[:6]}", rate_limit="2/minute"
        )
        # Non-ASCII in the audit trail, for the page's check of its hashes.
        _tenant_with_key(url, admin_token, name="Zürich ☃ 🚀")
        yield Server(url, backend.name, cwd, operator, tenant_id, tenant_key, xss_key, limited_key)


@pytest.fixture(scope="module")
def browser(server: Server) -> Iterator[Any]:
    """Debian's chromium, headless, for the module's tests on one backend (never a browser
    Playwright downloads). Started after the server: Playwright's synchronous API runs an event
    loop in this thread while the browser is open, and the fixtures that build a backend's
    database call asyncio.run."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield launched
        launched.close()


@dataclass
class Console:
    """A fresh browser context on the console, with what it did that a test must see."""

    page: Any
    server: Server
    foreign: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)

    def open(self, path: str = "/console/") -> None:
        self.page.goto(self.server.url + path)

    def check_accessibility(self, view: str) -> None:
        """axe-core's serious and critical violations on the page as it is now: none."""
        # Evaluated by the debugging protocol: the page's CSP, which refuses inline scripts,
        # does not apply to it (and must not be loosened for a test).
        if not self.page.evaluate("() => typeof window.axe !== 'undefined'"):
            self.page.evaluate(AXE.read_text() + "\n;0")
        violations = self.page.evaluate(
            """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
                .filter((v) => v.impact === "serious" || v.impact === "critical")
                .map((v) => `${v.id} (${v.impact}): ${v.nodes.map((n) => n.target).join(", ")}`)"""
        )
        assert violations == [], f"{view}: {violations}"

    def sign_in_tenant(self, key: str) -> None:
        self.open()
        self.check_accessibility("sign-in")
        self.page.get_by_label("API key", exact=True).fill(key)
        with self.page.expect_response("**/api/v1/auth/token") as answer:
            self.page.get_by_role("button", name="Sign in with a key").click()
        self.tokens.append(answer.value.json()["access_token"])
        self.page.wait_for_selector("#tenant-view:not([hidden]) [data-testid=tenant-name]")

    def sign_in_operator(self) -> None:
        self.open()
        self.page.get_by_label("E-mail address").fill(self.server.operator)
        self.page.get_by_label("Password").fill(PASSWORD)
        with self.page.expect_response("**/api/v1/auth/token") as answer:
            self.page.get_by_role("button", name="Sign in", exact=True).click()
        self.tokens.append(answer.value.json()["access_token"])
        self.page.wait_for_selector("#operator-view:not([hidden]) .tenant-name")

    def section(self, name: str) -> None:
        """Open an operator section and wait until none of its parts is loading."""
        self.page.get_by_role("button", name=name, exact=True).click()
        self.settle()

    def settle(self) -> None:
        self.page.wait_for_function("() => !document.querySelector('[aria-busy=true], .loading')")

    def secret_shown_once(self, prefix: str = "mg_") -> str:
        box = self.page.locator("[data-secret-once] input")
        box.wait_for()
        secret = str(box.input_value())
        assert secret.startswith(prefix)
        assert "shown this once" in self.page.locator("[data-secret-once]").inner_text()
        return secret

    def screenshot(self, name: str) -> None:
        """The page's first 1,300 pixels, for docs/console.md, on the SQLite run when
        MODELGATE_TEST_SCREENSHOTS names a directory."""
        if SCREENSHOTS and self.server.backend == "sqlite":
            height = min(1300, int(self.page.evaluate("() => document.body.scrollHeight")))
            self.page.screenshot(
                path=str(Path(SCREENSHOTS) / f"{name}.png"),
                full_page=True,
                clip={"x": 0, "y": 0, "width": 1100, "height": height},
            )


@pytest.fixture
def console(browser: Any, server: Server) -> Iterator[Console]:
    """A new context (nothing shared with another test: no token, no storage) whose requests to
    any origin but the server's are blocked and recorded."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    # Every wait is for something this server does in well under a second.
    context.set_default_timeout(10_000)
    page = context.new_page()
    seen = Console(page, server)

    def route(request_route: Any) -> None:
        url = request_route.request.url
        if url.startswith(server.url + "/") or url.startswith(("data:", "blob:")):
            request_route.continue_()
        else:
            seen.foreign.append(url)
            request_route.abort()

    context.route("**/*", route)
    page.on("console", lambda message: _console_error(seen, message))
    page.on("pageerror", lambda error: seen.errors.append(f"uncaught: {error}"))

    def dialog(opened: Any) -> None:
        seen.dialogs.append(f"{opened.type}: {opened.message}")
        if opened.type == "alert":
            opened.dismiss()
        else:
            opened.accept()

    page.on("dialog", dialog)
    try:
        yield seen
        assert seen.foreign == [], "requests to another origin"
        assert seen.errors == [], "errors in the page"
        assert not any(text.startswith("alert") for text in seen.dialogs), seen.dialogs
    finally:
        context.close()


def _console_error(seen: Console, message: Any) -> None:
    if message.type == "error":
        seen.errors.append(f"console: {message.text}")


def test_a_tenant_sees_its_usage_manages_a_key_and_signing_out_revokes_the_token(
    console: Console, server: Server
) -> None:
    key = server.tenant_key
    for features in (IRIS_SETOSA, [6.7, 3.0, 5.2, 2.3]):
        assert server.api("POST", "/predict", key, json={"features": features}).status_code == 200
    batch = {"instances": [IRIS_SETOSA, IRIS_SETOSA, IRIS_SETOSA]}
    assert server.api("POST", "/predict/batch", key, json=batch).status_code == 200

    console.sign_in_tenant(key)
    page = console.page
    # The key is not kept in the form, nor anywhere the browser persists things.
    assert page.get_by_label("API key", exact=True).input_value() == ""
    assert page.evaluate("() => [localStorage.length, sessionStorage.length, document.cookie]") == [
        0,
        0,
        "",
    ]
    assert console.tokens[0] not in page.url
    console.settle()
    usage = server.api("GET", "/me/usage", key).json()
    assert usage["total_units"] >= 5
    shown_requests = page.get_by_test_id("total-requests").inner_text()
    shown_units = page.get_by_test_id("total-units").inner_text()
    assert (int(shown_requests), int(shown_units)) == (
        usage["total_requests"],
        usage["total_units"],
    )
    assert page.locator(".chart canvas").count() == 1
    # The daily chart has a series for each model version used (its requests and its units),
    # and its numbers are /me/usage's by day, model and version.
    versions = sorted({f"{r['model']} {r['model_version']}" for r in usage["by_day_and_model"]})
    assert versions
    chart = page.locator(".chart")
    assert sorted(chart.get_attribute("data-series").split("; ")) == versions
    legend = page.locator(".chart .u-legend").inner_text()
    for version in versions:
        assert f"{version} requests" in legend
        assert f"{version} units" in legend
    shown_rows = page.locator("table", has_text="by day, model and version").locator("tbody tr")
    assert shown_rows.count() == len(usage["by_day_and_model"])
    first = usage["by_day_and_model"][0]
    # In a closed <details>: read as text, not as rendered.
    assert shown_rows.first.locator("td").all_text_contents() == [
        first["date"],
        first["model"],
        first["model_version"],
        str(first["requests"]),
        str(first["units"]),
    ]
    gauge = page.get_by_test_id("quota").inner_text()
    assert f"{usage['quota']['used']} of 10 units" in gauge
    assert "Alert thresholds crossed this month: 50 %" in gauge
    console.check_accessibility("tenant view")
    console.screenshot("tenant")

    # A new key: shown once, works, then revoked from the list and refused at /predict.
    name = f"ci-{uuid.uuid4().hex[:6]}"
    page.get_by_label("Name of the new key").fill(name)
    page.get_by_role("button", name="Create key").click()
    new_key = console.secret_shown_once()
    console.check_accessibility("tenant view, new key shown")
    predicted = server.api("POST", "/predict", new_key, json={"features": IRIS_SETOSA})
    assert predicted.status_code == 200
    console.settle()
    row = page.locator("tr", has_text=name)
    assert new_key[:11] in row.inner_text()
    # Rotated with no grace, from the list: its successor shown once, the old key refused.
    page.get_by_label("Grace period of a rotation").fill("0")
    page.get_by_role("button", name=f"Rotate key {name}").click()
    page.get_by_text(f'New key replacing "{name}"').wait_for()
    rotated_key = console.secret_shown_once()
    assert rotated_key != new_key
    assert new_key not in page.content()
    console.check_accessibility("tenant view, rotated key shown")
    server.refused_soon(new_key, "/models")
    predicted = server.api("POST", "/predict", rotated_key, json={"features": IRIS_SETOSA})
    assert predicted.status_code == 200
    console.settle()
    # The successor is revoked from the list, and refused at /predict.
    page.get_by_role("button", name=f"Revoke key {name}").click()
    page.get_by_text(f"Key {name} (").wait_for()
    assert rotated_key not in page.content()  # never shown again
    server.refused_soon(rotated_key, "/models")
    refused = server.api("POST", "/predict", rotated_key, json={"features": IRIS_SETOSA})
    assert refused.status_code == 401

    # The "try it" panel predicts and shows the curl command, without the credential.
    page.get_by_role("button", name="Send one prediction").click()
    page.locator("pre.json").wait_for()
    curl = page.get_by_test_id("curl").inner_text()
    assert "$MODELGATE_API_KEY" in curl
    assert key not in curl
    assert console.tokens[0] not in page.content()

    # Signing out revokes the token the page held: a copy of it stops working.
    token = console.tokens[0]
    assert server.api("GET", "/me", token).status_code == 200
    page.get_by_role("button", name="Sign out").click()
    page.get_by_text("Signed out. The token this page held has been revoked.").wait_for()
    # At once: the server has one worker, which dropped the token from its cache.
    assert server.api("GET", "/me", token).status_code == 401
    assert server.api("GET", "/me", key).status_code == 200  # the key itself still works


def test_a_tenant_adds_a_webhook_endpoint_sees_its_secret_once_and_reads_its_delivery_log(
    console: Console, server: Server
) -> None:
    console.sign_in_tenant(server.tenant_key)
    page = console.page
    console.settle()
    hook = f"http://127.0.0.1:{free_port()}/hooks/{uuid.uuid4().hex[:6]}"
    page.get_by_label("Endpoint URL (https)").fill(hook)
    page.get_by_role("checkbox", name="webhook.test").check()
    page.get_by_role("button", name="Add endpoint").click()
    secret = console.secret_shown_once("whsec_")
    console.settle()
    page.get_by_role("button", name=f"Send test event to {hook}").click()
    page.get_by_text("A webhook.test event was queued.").wait_for()
    assert secret not in page.content()
    # The delivery fails (nothing listens there) and the log says so.
    deadline = time.monotonic() + 15
    while True:
        page.get_by_role("button", name=f"Deliveries to {hook}").click()
        console.settle()
        if page.locator(".deliveries tbody tr").count():
            break
        assert time.monotonic() < deadline, "no delivery attempt logged"
        page.wait_for_timeout(500)
    attempt = page.locator(".deliveries tbody tr").first.inner_text()
    assert "network_error" in attempt
    console.check_accessibility("tenant view, webhooks")


def test_an_operator_creates_suspends_activates_and_finds_each_action_in_the_audit_view(
    console: Console, server: Server
) -> None:
    console.sign_in_operator()
    page = console.page
    console.settle()
    console.check_accessibility("operator: tenants")

    name = f"newco-{uuid.uuid4().hex[:6]}"
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Create tenant").click()
    page.get_by_role("heading", name=f"Tenant {name}").wait_for()
    console.settle()
    page.get_by_role("button", name="Issue key").click()
    first_key = console.secret_shown_once()
    assert server.api("GET", "/me", first_key).status_code == 200
    console.check_accessibility("operator: a tenant")
    # Rotated with no grace: a new key, shown once; the old one is refused.
    console.settle()
    page.get_by_label("Grace period of a rotation").fill("0")
    page.get_by_role("button", name="Rotate key default").click()
    page.get_by_text('New key replacing "default"').wait_for()
    key = console.secret_shown_once()
    assert key != first_key
    server.refused_soon(first_key)
    assert server.api("POST", "/predict", key, json={"features": IRIS_SETOSA}).status_code == 200

    # Its quota, edited.
    page.get_by_label("Monthly quota override").fill("1000")
    page.get_by_role("button", name="Save").click()
    page.get_by_text(f"Saved {name}.").wait_for()
    console.settle()
    assert server.api("GET", "/me", key).json()["tenant"]["monthly_quota"] == 1000

    page.get_by_role("button", name="Suspend tenant").click()
    page.get_by_test_id("tenant-status").filter(has_text="suspended").wait_for()
    console.settle()
    console.screenshot("operator")
    server.refused_soon(key, "/models")
    assert server.api("POST", "/predict", key, json={"features": IRIS_SETOSA}).status_code == 403

    console.section("Models")
    console.check_accessibility("operator: models")
    page.get_by_role("button", name="Activate version 2 of iris").click()
    page.get_by_text("iris version 2 is active").wait_for()
    console.settle()
    assert server.api("GET", "/models/iris", server.tenant_key).json()["active_version"] == "2"
    # A third version pulled from a file, then activated.
    page.get_by_role("textbox", name="Source").fill(f"file://{server.cwd / 'iris.skops'}")
    page.get_by_label("Served name").fill("iris")
    page.get_by_label("Version (optional)").fill("3")
    page.get_by_role("button", name="Pull", exact=True).click()
    page.get_by_text("Pulled iris version 3").wait_for()
    console.settle()
    # Loaded when activated: by name, as a version not listed yet would be.
    page.get_by_label("Version to activate").fill("3")
    page.get_by_role("button", name="Activate", exact=True).click()
    page.get_by_text("iris version 3 is active (was 2)").wait_for()
    console.settle()
    assert server.api("GET", "/models/iris", server.tenant_key).json()["active_version"] == "3"

    console.section("Audit trail")
    for action in ("tenant.create", "key.issue", "tenant.suspend", "model.activate", "model.pull"):
        page.get_by_label("Action").fill(action)
        page.get_by_role("button", name="Search the trail").click()
        console.settle()
        rows = page.locator("tbody tr")
        assert rows.count() >= 1, action
        assert action in rows.first.inner_text()
    page.get_by_label("Action").fill("")
    page.get_by_role("button", name="Search the trail").click()
    console.settle()
    # Every event shown, its hash recomputed in the page (non-ASCII names among them)...
    page.get_by_text("Verified: the").wait_for()
    # ...and the whole chain, verified by the server: intact, with the head hash that
    # /admin/audit/verify (and `modelgate audit verify`) gives.
    page.get_by_role("button", name="Verify the whole chain").click()
    console.settle()
    verified = server.api("GET", "/admin/audit/verify", console.tokens[0]).json()
    assert verified["intact"] is True
    assert "The whole chain is intact" in page.get_by_test_id("chain-verification").inner_text()
    assert page.get_by_test_id("chain-head").inner_text() == verified["head"]
    console.screenshot("audit")
    console.check_accessibility("operator: audit trail")

    # ...so that an event edited on its way is caught (here, in the browser).
    def edited(request_route: Any) -> None:
        answer = request_route.fetch()
        body = answer.json()
        body["events"][1]["detail"]["edited"] = True
        request_route.fulfill(response=answer, json=body)

    page.route("**/api/v1/admin/audit*", edited)
    page.get_by_role("button", name="Search the trail").click()
    console.settle()
    page.get_by_text("does not match its hash").wait_for()
    page.unroute("**/api/v1/admin/audit*")
    # A broken chain names its first bad event (the answer altered on its way, here).
    page.route(
        "**/api/v1/admin/audit/verify",
        lambda request_route: request_route.fulfill(
            json={
                "intact": False,
                "events": 6,
                "head": verified["head"],
                "first_bad_id": 7,
                "problem": "event 7 was edited",
            }
        ),
    )
    page.get_by_role("button", name="Verify the whole chain").click()
    console.settle()
    broken = page.get_by_test_id("chain-verification").inner_text()
    assert "The chain is broken at event 7: event 7 was edited." in broken
    page.unroute("**/api/v1/admin/audit/verify")
    console.check_accessibility("operator: audit trail, the chain verified")

    # Usage: the new tenant's one prediction, in the top tenants and its chart.
    console.section("Usage")
    console.check_accessibility("operator: Usage")
    assert page.locator("tr", has_text=name).count() == 1
    page.get_by_role("button", name=f"Chart the usage of {name}").click()
    console.settle()
    assert page.get_by_test_id("total-units").inner_text() == "1"
    assert page.locator(".chart canvas").count() == 1

    # Billing: this month's export, downloaded.
    console.section("Billing")
    console.check_accessibility("operator: Billing")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the export").click()
    exported = Path(download.value.path()).read_text()
    assert exported.startswith("tenant_id,tenant_name,date,model,model_version,requests,units")
    assert name in exported

    for section in ("Plans", "Webhooks"):
        console.section(section)
        console.check_accessibility(f"operator: {section}")
    # Back to the version the other tests predict with.
    restored = server.api(
        "POST", "/admin/models/iris/activate", console.tokens[0], json={"version": "1"}
    )
    assert restored.status_code == 200
    page.get_by_role("button", name="Sign out").click()
    server.refused_soon(console.tokens[0], "/admin/tenants")


def _tab_to(page: Any, selector: str, presses: int = 40) -> None:
    """Press Tab until the element matching ``selector`` has the keyboard focus."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        if page.evaluate("(s) => document.activeElement.matches(s)", selector):
            return
    raise AssertionError(f"{selector} cannot be reached with the keyboard")


def test_a_tenant_named_as_html_is_shown_as_that_text_and_no_script_runs(
    console: Console, server: Server
) -> None:
    """On a phone-sized screen, with the keyboard alone."""
    page = console.page
    page.set_viewport_size({"width": 375, "height": 800})
    console.open()
    _tab_to(page, "#tenant-key")
    page.keyboard.type(server.xss_key)
    page.keyboard.press("Enter")
    page.get_by_test_id("tenant-name").wait_for()
    console.settle()
    assert page.get_by_test_id("tenant-name").inner_text() == XSS_NAME
    assert page.locator("img[src=x]").count() == 0
    # Nothing wider than the screen but what scrolls inside its own box (the tables).
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375
    console.check_accessibility("tenant view, 375 px wide")
    _tab_to(page, "#sign-out")
    page.keyboard.press("Enter")
    page.get_by_text("Signed out.").wait_for()
    page.set_viewport_size({"width": 1100, "height": 900})
    console.sign_in_operator()
    assert page.locator(".tenant-name", has_text=XSS_NAME).count() == 1
    assert page.locator("img[src=x]").count() == 0
    page.wait_for_timeout(200)  # an onerror handler would have run by now
    assert console.dialogs == []


def test_a_tenant_over_its_rate_limit_is_told_when_to_retry(
    console: Console, server: Server
) -> None:
    """The server's own 429: a key allowed 2 requests a minute, and a view that makes more."""
    console.sign_in_tenant(server.limited_key)
    console.settle()
    refused = console.page.locator(".notice.error", has_text="(429)")
    assert refused.count() >= 1
    text = refused.first.inner_text()
    assert re.search(r"Try again in \d+ seconds?\.", text), text
    console.check_accessibility("tenant view, rate-limited")
    # The browser reports each refused request as an error: they were the point here.
    assert all("429" in error for error in console.errors), console.errors
    console.errors.clear()


def test_rate_limits_and_outages_say_when_to_retry_and_a_refused_token_signs_out(
    console: Console, server: Server
) -> None:
    """The error states the server is hard to bring about on demand (a 503, a 429 with a given
    Retry-After, a token refused mid-session), with the API's answers replaced in the browser:
    what happened, and when to try again. The server's own 429 is the test above."""
    answers: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {}

    def answer(path: str) -> Callable[[Any], None]:
        def fulfil(request_route: Any) -> None:
            status, headers, body = answers[path]
            request_route.fulfill(
                status=status,
                headers={**headers, "Content-Type": "application/problem+json"},
                body=json.dumps(body),
            )

        return fulfil

    console.page.route("**/api/v1/me/usage*", answer("usage"))
    answers["usage"] = (
        429,
        {"Retry-After": "7"},
        {"type": "rate-limited", "title": "Too many requests", "status": 429, "detail": "x"},
    )
    console.sign_in_tenant(server.tenant_key)
    page = console.page
    page.get_by_text("Try again in 7 seconds.").wait_for()
    answers["usage"] = (
        503,
        {"Retry-After": "2"},
        {"type": "service-unavailable", "title": "Service unavailable", "status": 503},
    )
    page.get_by_role("button", name="Retry").click()
    page.get_by_text("Service unavailable (503)").wait_for()
    page.get_by_text("Try again in 2 seconds.").wait_for()
    console.check_accessibility("tenant view, errors")
    answers["usage"] = (
        401,
        {"WWW-Authenticate": "Bearer"},
        {"type": "unauthenticated", "title": "Unauthenticated", "status": 401, "detail": "expired"},
    )
    page.get_by_role("button", name="Retry").click()
    page.get_by_text("Your session ended").wait_for()
    assert page.locator("#sign-in").is_visible()
    # The browser logs the failed requests themselves as errors: they were the point here.
    console.errors.clear()


def test_an_expired_session_says_so_and_asks_to_sign_in_again(
    console: Console, server: Server
) -> None:
    """The page's clock, run past the token's lifetime (15 minutes)."""
    console.page.clock.install()
    console.sign_in_tenant(server.tenant_key)
    console.settle()
    console.page.clock.fast_forward("15:01")
    console.page.get_by_text("Your session expired. Sign in again to continue.").wait_for()
    assert console.page.locator("#sign-in").is_visible()
    assert console.page.locator("#tenant-view").is_hidden()


def test_docs_and_redoc_render_with_every_other_origin_blocked(console: Console) -> None:
    console.open("/docs")
    console.page.locator(".opblock").first.wait_for()
    assert console.page.locator(".opblock").count() > 40
    console.page.get_by_text("/api/v1/auth/revoke").first.wait_for()
    console.open("/redoc")
    console.page.get_by_role("heading", name="Revoke Own Token").first.wait_for()
    # ReDoc's bundle shows its vendor's logo from its CDN; the page's policy keeps the browser
    # from asking for it (api.console.REDOC_HEADERS), which the browser reports, and ReDoc
    # hides the image. That report is the one error expected here.
    refused = [error for error in console.errors if "cdn.redoc.ly" in error]
    assert len(refused) == 1, console.errors
    assert "Content Security Policy" in refused[0]
    console.errors.remove(refused[0])
