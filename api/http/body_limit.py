"""The request body limit (``MODELGATE_MAX_BODY_BYTES``), enforced when the body is read.

Starlette's ``RequestBodyLimitMiddleware`` answers 413 for a ``Content-Length`` over the limit
whatever the app answers, even when the app never reads the body; that would turn the 401 that a
route gives an unauthenticated request before reading anything
(``api.http.deps.CredentialFirstRoute``) into a 413, and tell an anonymous client how large a body
the service accepts. Here the limit is enforced on ``receive``: reading a body whose declared
length is over the limit fails at once, before a byte is read, and so does reading past the limit
(413, ``payload-too-large``); a route that answers without reading the body answers as it means
to.

``api.http.middleware.RequestContextMiddleware`` gives the app the limited ``receive``. A
response that starts while the request's body is still unread (a 401 before the body, a 413)
carries ``Connection: close``: the server never reads the rest, so the client should stop
sending it, and the connection cannot carry another request.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope

# The header a response gets when it starts while the request's body is still unread.
CLOSE = (b"connection", b"close")


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


class LimitedBody:
    """A request's body as the app reads it (its :meth:`receive`): reading a body declared
    over ``limit`` bytes fails at once, before a byte is read, and so does reading past it
    (``BodyTooLarge``); ``complete`` says whether the whole body has been read."""

    __slots__ = ("_declared", "_limit", "_receive", "_received", "complete")

    def __init__(self, receive: Receive, limit: int, declared: int | None) -> None:
        self._receive = receive
        self._limit = limit
        self._declared = declared
        self._received = 0
        self.complete = False

    async def receive(self) -> Message:
        if self._declared is not None and self._declared > self._limit:
            raise BodyTooLarge
        message = await self._receive()
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            if self._received > self._limit:
                raise BodyTooLarge
            self.complete = not message.get("more_body", False)
        return message


def limited_body(scope: Scope, receive: Receive, max_body_size: int) -> LimitedBody | None:
    """The request's body behind the limit, or None if the request announces no body (nothing
    to limit, and nothing left unread when its response starts)."""
    announced, declared = _declared_body(scope)
    return LimitedBody(receive, max_body_size, declared) if announced else None
