"""A client that goes away before its answer: logged and counted as 499 (nginx's "client closed
request"), never billed, its concurrency slot given back.

How a disconnect reaches the app, and what becomes of it:
- while the app reads the body (a body that stops halfway), the server's ``receive`` answers
  ``http.disconnect``: Starlette raises ``ClientDisconnect``, which FastAPI turns into a 400
  "error parsing the body"; ``api.http.errors`` gives that 400 back its cause;
- while the app works on a request it has read whole (a slow prediction), uvicorn tells nobody:
  the app runs on and uvicorn drops its answer. So ``api.inference.metering.charge`` first asks
  :func:`client_has_gone`, and bills nothing for a client that has gone (``ClientDisconnect``);
  a client that leaves after that question is billed for the answer it was sent;
- while a streamed answer is sent (the billing export), Starlette raises ``ClientDisconnect``;
- a server or test client that cancels the request's task raises ``CancelledError`` in it.
``RequestContextMiddleware`` logs and counts each of these as :data:`CLIENT_CLOSED_REQUEST`
(``CancelledError`` too: uvicorn cancels a request only when its graceful shutdown runs out).
"""

from __future__ import annotations

import inspect

from starlette.types import Receive

# The status logged and counted for a request whose client went away before its answer.
CLIENT_CLOSED_REQUEST = 499


def client_has_gone(receive: Receive) -> bool:
    """Whether the server has already said (``http.disconnect``) that the request's client went
    away; asked without waiting and without yielding to the event loop. Only for a request whose
    body has been read whole: any other message it would take is lost.

    ``receive()`` is started by hand: if the server has a message ready it returns it at once;
    otherwise it would wait for the client, so the client is still there, and the waiting
    ``receive()`` is closed, which takes back the wait it registered.
    """
    pending = receive()
    if not inspect.iscoroutine(pending):
        return False  # not a coroutine that can be started by hand: assume the client is there
    try:
        pending.send(None)
    except StopIteration as finished:
        message = finished.value
        return isinstance(message, dict) and message.get("type") == "http.disconnect"
    pending.close()
    return False
