"""The web console at ``/console/`` and the self-hosted API documentation (``/docs``, ``/redoc``).

The console is static files (HTML, CSS, ES modules) that call the public JSON API with the
credential the user signs in with: it has no route of its own, so it can do nothing a client of
the API could not. Its responses carry a strict Content-Security-Policy (scripts and styles from
this origin only, no inline code, no framing). Third-party assets (uPlot for the console's
charts, Swagger UI and ReDoc for the documentation) are vendored under ``assets/vendor/`` with
their versions, licences and digests in ``assets/vendor/VENDORED.md``: nothing is loaded from
another origin, so both work air-gapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth.settings import Settings

HERE = Path(__file__).parent
STATIC_DIR = HERE / "static"
ASSETS_DIR = HERE / "assets"
CONSOLE_PATH = "/console"
ASSETS_PATH = "/assets"
VENDOR = f"{ASSETS_PATH}/vendor"
FAVICON = f"{ASSETS_PATH}/favicon.svg"
DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"

# default-src 'self' covers scripts, styles, images, fonts and fetch(); what is named again is
# what default-src does not cover (frame-ancestors, base-uri, form-action) or what must be
# narrower still (no plugins). Inline scripts and styles are refused: an injected value can
# never run, even if a bug rendered it as HTML.
CONSOLE_CSP = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data:",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    )
)
# X-Content-Type-Options: nosniff is on every response already (api.http.middleware).
_COMMON_HEADERS = (
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
)
CONSOLE_HEADERS = (
    (b"content-security-policy", CONSOLE_CSP.encode()),
    # Revalidated on every load (cheap: ETag), so that an upgrade's page and modules are used
    # together at once, never an old module with a new page.
    (b"cache-control", b"no-cache"),
    *_COMMON_HEADERS,
)
# ReDoc's bundle always shows its vendor's logo from cdn.redoc.ly (and hides it when it fails to
# load): on /redoc, images may come from this origin only, so the browser never asks another
# origin for anything (nor tells it, through a Referer, who reads these docs).
REDOC_HEADERS = {
    "Content-Security-Policy": "img-src 'self' data:",
    "Referrer-Policy": "no-referrer",
}
ASSET_HEADERS = ((b"cache-control", b"public, max-age=3600"), *_COMMON_HEADERS)


@dataclass(frozen=True)
class MountLabel:
    """What the request log and metrics name a static file's route by (``route_template`` reads
    ``path_format``): the mount's path, one value for all its files, never a client's path."""

    path_format: str


class WithHeaders:
    """An ASGI app that sets ``headers`` on every response of ``app`` (replacing any of the same
    name): the static files' security headers. Its requests are logged and counted under
    ``path`` (a mount is no route, and would be ``unmatched``)."""

    def __init__(self, app: ASGIApp, headers: tuple[tuple[bytes, bytes], ...], path: str) -> None:
        self.app = app
        self.headers = headers
        self._names = {name for name, _ in headers}
        self._label = MountLabel(path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = self._label

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                kept = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in self._names
                ]
                message["headers"] = [*kept, *self.headers]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def install_console(app: FastAPI, settings: Settings) -> None:
    """Serve the shared assets at ``/assets`` (the documentation needs them too) and, unless
    ``MODELGATE_CONSOLE=false``, the console at ``/console/``."""
    app.mount(
        ASSETS_PATH,
        WithHeaders(StaticFiles(directory=ASSETS_DIR), ASSET_HEADERS, ASSETS_PATH),
        name="assets",
    )
    if settings.console:
        app.mount(
            CONSOLE_PATH,
            WithHeaders(
                StaticFiles(directory=STATIC_DIR, html=True), CONSOLE_HEADERS, CONSOLE_PATH
            ),
            name="console",
        )


def install_api_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` from the vendored assets, not a CDN: FastAPI's own
    pages load their scripts, styles, favicon and (ReDoc) fonts from other origins, and are
    blank without internet. The app is built with ``docs_url=None, redoc_url=None``."""
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=FAVICON,
            # Swagger UI would send the document to validator.swagger.io for its badge.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(REDOC_PATH, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{VENDOR}/redoc/redoc.standalone.js",
            redoc_favicon_url=FAVICON,
            with_google_fonts=False,
        )
        page.headers.update(REDOC_HEADERS)
        return page
