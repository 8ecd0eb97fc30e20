"""Helpers the integration tests share: waiting with a deadline, running workers in threads,
a proxy that makes PostgreSQL unreachable."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest

from streaming.relay import Relay


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(*workers: Any) -> Iterator[None]:
    """Run each ``worker.run()`` in a thread; ``stop()`` them and fail on their errors."""
    errors: list[BaseException] = []

    def target(worker: Any) -> None:
        try:
            worker.run()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=target, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(60)
    assert not any(t.is_alive() for t in threads), "a worker did not stop"
    assert errors == [], f"a worker failed: {errors!r}"


def relay_all(relay: Relay) -> int:
    """Call ``relay_once`` until the store has nothing more; the last position."""
    position = relay.position.get()
    while moved := relay.relay_once(position):
        position = moved
    return position


class TcpProxy:
    """A TCP proxy to PostgreSQL that a test can cut, to make the database unreachable.

    ``cut("refuse")`` is the server gone: open connections are closed and new ones
    closed at once. ``cut("hold")`` is a network that drops everything: connections
    stay open, but nothing reaches the server any more and new ones are accepted and
    left unanswered. ``restore()`` lets new connections through again (the old
    ones are closed: what they sent is lost).
    """

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 5432)):
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.mode = "up"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        """``database_url`` with this proxy's port."""
        parts = urlparse(database_url)
        user = parts.netloc.rpartition("@")[0]
        return parts._replace(
            netloc=f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        ).geturl()

    def cut(self, mode: str) -> None:
        assert mode in ("refuse", "hold")
        self.mode = mode
        if mode == "refuse":
            self._close_all()

    def restore(self) -> None:
        self.mode = "up"
        self._close_all()

    def close(self) -> None:
        self.listener.close()
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            doomed, self._sockets = self._sockets, []
        for sock in doomed:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.mode == "refuse":
                client.close()
                continue
            with self._lock:
                self._sockets.append(client)
            if self.mode == "hold":
                continue
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.mode == "up":  # held: what was sent is dropped on the floor
                    sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
