"""The HTTP server under falcon: uvicorn's httptools protocol, answering as the API does.

uvicorn parses each request before falcon sees it, and answers what it cannot
parse (an unknown method such as ``FOO``, a bad or conflicting Content-Length, a
malformed request line) itself, in plain text. Here those answers are the API's
JSON errors, and a request whose client stops sending it half-way is answered
408 and dropped after ``TADPOLE_BODY_TIMEOUT`` instead of holding its connection
(and the falcon responder waiting on its body) for ever.
"""

from __future__ import annotations

import asyncio
import functools
import http
import logging
import sys
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.workers import UvicornWorker

from service.settings import load_settings

log = logging.getLogger(__name__)


class TadpoleProtocol(HttpToolsProtocol):
    """HTTP/1.1 with JSON error answers and a deadline on receiving each request."""

    def __init__(self, *args: Any, body_timeout: float = 10.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.body_timeout = body_timeout
        self.deadline: asyncio.TimerHandle | None = None
        self.receiving: RequestResponseCycle | None = None
        self.previous: RequestResponseCycle | None = None

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its `except HttpParserError` clause: the error being
        # handled is the parser's, and its message says what was wrong.
        reason = sys.exc_info()[1]
        self.refuse(400, f"malformed HTTP request: {reason or msg}")

    def refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with the API's JSON error body, then close the connection."""
        body = orjson.dumps({"success": False, "error": message})
        lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [
            b"content-type: application/json",
            b"content-length: " + str(len(body)).encode(),
            b"connection: close",
        ]
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        self.transport.close()

    # The deadline runs from a request's first byte to its last.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.previous, self.receiving = self.cycle, None
        self._disarm()
        self.deadline = self.loop.call_later(self.body_timeout, self._timed_out)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.receiving = self.cycle

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _timed_out(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        log.info("dropping %s: request not received within %ss", self.client, self.body_timeout)
        cycle = self.receiving
        if cycle is not None:
            # The responder waiting on the body is told the client left; what it
            # answers then is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        if self._mid_answer(cycle):
            self.transport.close()  # answered already (a 401, a 413): only drop it
        else:
            self.refuse(408, f"the request was not received within {self.body_timeout:g} s")

    def _mid_answer(self, cycle: RequestResponseCycle | None) -> bool:
        """Whether an answer is on the wire (this request's, or a pipelined earlier one's)."""
        earlier = self.previous is not None and not self.previous.response_complete
        return earlier or (cycle is not None and cycle.response_started)


class TadpoleWorker(UvicornWorker):
    """gunicorn's worker class for the API: uvicorn with :class:`TadpoleProtocol`."""

    def __init__(self, *args: Any, **kwargs: Any):
        protocol = functools.partial(TadpoleProtocol, body_timeout=load_settings().body_timeout)
        self.CONFIG_KWARGS = {**UvicornWorker.CONFIG_KWARGS, "http": protocol}
        super().__init__(*args, **kwargs)
