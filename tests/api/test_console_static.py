"""The console's static files and the self-hosted API documentation, served in-process: the
security headers, MODELGATE_CONSOLE=false, nothing that names another origin, no HTML built from
strings, and the vendored files' digests. The browser tests are tests/e2e/test_console.py."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from api.console import ASSETS_DIR, CONSOLE_CSP, STATIC_DIR
from tests.conftest import Backend, make_settings

ROOT = Path(__file__).resolve().parents[2]
VENDORED = ASSETS_DIR / "vendor" / "VENDORED.md"
# A URL with a scheme and a host: what a page must not load from. The vendored bundles are not
# searched (their code names the specification URLs of what they implement, in strings never
# fetched); the browser tests prove that nothing is loaded from another origin.
ABSOLUTE_URL = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)


def _client(backend: Backend, tmp_path: Path, **overrides: object) -> httpx.AsyncClient:
    settings = make_settings(backend, tmp_path / "models", tmp_path / "var", **overrides)
    app = create_app(settings)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_console_pages_carry_a_strict_policy_and_are_off_when_disabled(
    backend: Backend, tmp_path: Path
) -> None:
    async with _client(backend, tmp_path) as client:
        redirect = await client.get("/console")
        assert redirect.status_code in (307, 308)
        assert redirect.headers["location"].endswith("/console/")
        for path in ("/console/", "/console/js/main.js", "/console/console.css"):
            response = await client.get(path)
            assert response.status_code == 200, path
            assert response.headers["content-security-policy"] == CONSOLE_CSP
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
            assert response.headers["x-frame-options"] == "DENY"
        policy = dict(part.split(" ", 1) for part in CONSOLE_CSP.split("; "))
        assert policy["default-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert policy["base-uri"] == "'none'"
        assert "script-src" not in policy  # default-src 'self': no inline script, no eval
        assert "style-src" not in policy
        script = await client.get("/console/js/main.js")
        assert script.headers["content-type"].startswith("text/javascript")
        missing = await client.get("/console/nothing-here.js")
        assert missing.status_code == 404
        asset = await client.get("/assets/vendor/uplot/uPlot.esm.js")
        assert asset.status_code == 200
        assert asset.headers["referrer-policy"] == "no-referrer"
    async with _client(backend, tmp_path, console=False) as client:
        assert (await client.get("/console/")).status_code == 404
        assert (await client.get("/console/js/main.js")).status_code == 404
        # The documentation's assets stay: /docs needs them.
        assert (await client.get("/assets/vendor/swagger-ui/swagger-ui.css")).status_code == 200


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_docs_and_redoc_load_only_vendored_assets(backend: Backend, tmp_path: Path) -> None:
    async with _client(backend, tmp_path) as client:
        for path, assets in (
            ("/docs", ("swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css")),
            ("/redoc", ("redoc/redoc.standalone.js",)),
        ):
            page = await client.get(path)
            assert page.status_code == 200
            assert ABSOLUTE_URL.search(page.text) is None, ABSOLUTE_URL.search(page.text)
            for asset in assets:
                assert f"/assets/vendor/{asset}" in page.text
                assert (await client.get(f"/assets/vendor/{asset}")).status_code == 200
        assert (await client.get("/assets/favicon.svg")).status_code == 200
        assert (await client.get("/")).json()["docs"] == "/docs"


def test_console_sources_load_nothing_from_elsewhere_and_never_parse_html() -> None:
    sources = [path for path in STATIC_DIR.rglob("*") if path.is_file()]
    assert {path.suffix for path in sources} == {".html", ".css", ".js"}
    for path in sources:
        text = path.read_text()
        assert ABSOLUTE_URL.search(text) is None, (path, ABSOLUTE_URL.search(text))
        # Values from the API are rendered as text: no API that parses a string as HTML.
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in text, (path, sink)
        if path.suffix == ".html":
            # Were the script not to run, a submitted credential must not land in a URL.
            for form in re.findall(r"<form[^>]*>", text):
                assert 'method="post"' in form, form
            assert "style=" not in text
            assert re.search(r"<script(?![^>]*\bsrc=)", text) is None, "inline script"
            assert "<style" not in text


def _vendored_rows() -> list[tuple[str, str]]:
    """(path relative to the repository, SHA-256) of every row of VENDORED.md's tables."""
    rows = []
    for line in VENDORED.read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"[0-9a-f]{64}", cells[6]):
            name = cells[5]
            path = name if name.startswith("tests/") else f"api/console/assets/vendor/{name}"
            rows.append((path, cells[6]))
    return rows


def test_every_vendored_file_is_recorded_with_its_digest() -> None:
    rows = _vendored_rows()
    recorded = {path for path, _ in rows}
    on_disk = {
        str(path.relative_to(ROOT))
        for path in [*(ASSETS_DIR / "vendor").rglob("*"), *(ROOT / "tests/e2e/console").rglob("*")]
        if path.is_file() and path != VENDORED
    }
    assert recorded == on_disk
    for path, digest in rows:
        assert hashlib.sha256((ROOT / path).read_bytes()).hexdigest() == digest, path
