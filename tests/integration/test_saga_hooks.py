"""A saga step's HTTP hook against a real HTTP server: retries, then the circuit breaker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pybreaker
import pytest

from sagas.client import Taken
from sagas.handlers import BREAKER_FAILURES, Breaker, HttpHook

pytestmark = pytest.mark.integration


class Hooked:
    """A server answering the statuses in ``answers`` in turn (the last one after that)."""

    def __init__(self) -> None:
        self.answers: list[int] = [200]
        self.bodies: list[dict[str, Any]] = []
        hooked = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                hooked.bodies.append(json.loads(self.rfile.read(length)))
                status = hooked.answers.pop(0) if len(hooked.answers) > 1 else hooked.answers[0]
                body = json.dumps({"seen": len(hooked.bodies)}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def hooked() -> Iterator[Hooked]:
    server = Hooked()
    yield server
    server.server.shutdown()
    server.server.server_close()


def taken() -> Taken:
    return Taken(
        "saga-" + "2" * 32,
        "agent_spawning",
        "register_with_mesh",
        "deregister_from_mesh",
        2,
        datetime.now(UTC) + timedelta(seconds=3),
        {"targetId": "t1"},
        None,
        False,
    )


async def test_a_hook_is_retried_through_5xx_and_its_answer_becomes_the_outcome(
    hooked: Hooked,
) -> None:
    hooked.answers = [503, 502, 200]
    async with httpx.AsyncClient() as client:
        hook = HttpHook(hooked.url, client, Breaker("h"), base=0.01, most=0.05)
        report = await hook(taken())
    assert report.ok and report.outcome == {"seen": 3} and report.apply
    assert [b["step"] for b in hooked.bodies] == ["register_with_mesh"] * 3
    assert hooked.bodies[0]["sagaId"] == "saga-" + "2" * 32


async def test_a_hook_that_is_down_opens_the_breaker_after_five_failures() -> None:
    breaker = Breaker("down", recovery=30)
    async with httpx.AsyncClient(timeout=1) as client:
        # Nothing listens on port 9 (discard) here: every attempt is refused.
        hook = HttpHook("http://127.0.0.1:9/hook", client, breaker, attempts=1, base=0.01)
        for n in range(BREAKER_FAILURES):
            report = await hook(taken())
            assert not report.ok
            if n < BREAKER_FAILURES - 1:
                assert "failed 1 times" in report.error and breaker.state == pybreaker.STATE_CLOSED
        assert "circuit breaker opened" in report.error  # the fifth trips it
        assert breaker.state == pybreaker.STATE_OPEN
        refused = await hook(taken())
    assert not refused.ok and "circuit" in refused.error.lower()
