"""The request body limit (``MODELGATE_MAX_BODY_BYTES``), enforced when the body is read.

Starlette's ``RequestBodyLimitMiddleware`` answers 413 for a ``Content-Length`` over the limit
whatever the app answers, even when the app never reads the body; that would turn the 401 that a
route gives an unauthenticated request before reading anything
(``api.http.deps.CredentialFirstRoute``) into a 413, and tell an anonymous client how large a body
the service accepts. Here the limit is enforced on ``receive``: reading a body whose declared
length is over the limit fails at once, before a byte is read, and so does reading past the limit
(413, ``payload-too-large``); a route that answers without reading the body answers as it means
to.

A response that starts while the request's body is still unread (a 401 before the body, a 413)
carries ``Connection: close``: the server never reads the rest, so the client should stop
sending it, and the connection cannot carry another request.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CLOSE = (b"connection", b"close")


class BodyTooLarge(HTTPException):
    """The body is, or would be, over the limit (answered 413 by the app's handlers)."""

    def __init__(self) -> None:
        super().__init__(status_code=413, detail="the request body exceeds the size limit")


def _declared_body(scope: Scope) -> tuple[bool, int | None]:
    """Whether the request announces a body, and its Content-Length if it gives a valid one."""
    announced, length = False, None
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
            announced = announced or length != 0
        elif name == b"transfer-encoding":
            announced = True
    return announced, length


class BodyLimitMiddleware:
    """Refuse to read more than ``max_body_size`` bytes of any request body."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.app = app
        self.max_body_size = max_body_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        announced, declared = _declared_body(scope)
        if not announced:
            await self.app(scope, receive, send)
            return
        limit = self.max_body_size
        received = 0
        complete = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if declared is not None and declared > limit:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
                complete = not message.get("more_body", False)
            return message

        async def send_closing_if_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and not complete:
                message["headers"] = [*message.get("headers", []), _CLOSE]
            await send(message)

        await self.app(scope, limited_receive, send_closing_if_unread)
