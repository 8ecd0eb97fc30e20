"""A small keep-alive HTTP/1.1 client for the load driver (one connection, one request at a time).

The load client shares the benchmark machine's two cores with everything it
measures, so it should cost as little as it can: a request is one ``write`` of
head and body together (aiohttp writes them apart, two segments the server reads
twice), and a response is read by its ``Content-Length``, nothing more. Real
spots run on their own machines; here every microsecond the client spends is
taken from the server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson


class HttpError(RuntimeError):
    """The connection broke or the answer was not HTTP/1.1 with a Content-Length."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.head_end = -1
        self.length = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(f"connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head_end = end + 4
            head = bytes(self.buffer[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            if at < 0:
                self._fail("response without Content-Length")
                return
            line_end = head.find(b"\r\n", at + 2)
            self.length = int(head[at + 17 : line_end if line_end >= 0 else len(head)])
        if len(self.buffer) < self.head_end + self.length:
            return
        status = int(self.buffer[9:12])
        body = bytes(self.buffer[self.head_end : self.head_end + self.length])
        del self.buffer[: self.head_end + self.length]
        self.head_end = -1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, body))

    def _fail(self, why: str) -> None:
        if self.transport is not None:
            self.transport.close()  # the stream cannot be trusted past this point
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(HttpError(why))


class Connection:
    """One keep-alive connection to ``host:port``."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.protocol: _Protocol | None = None
        self.host_header = f"Host: {host}:{port}\r\n".encode()

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        return protocol

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Send one request; its status and JSON-decoded body."""
        if self.protocol is None or self.protocol.transport is None:
            self.protocol = await self._connect()
        protocol = self.protocol
        payload = b"" if body is None else orjson.dumps(body)
        head = (
            f"{method} {path} HTTP/1.1\r\n".encode()
            + self.host_header
            + b"Content-Type: application/json\r\nContent-Length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
        )
        protocol.waiter = asyncio.get_running_loop().create_future()
        protocol.transport.write(head + payload)
        try:
            status, raw = await protocol.waiter
        except HttpError:
            self.protocol = None
            raise
        return status, orjson.loads(raw) if raw else None

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None
