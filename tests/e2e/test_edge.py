"""The API's edge on the real server: `tadpole api` (gunicorn + uvicorn) over raw sockets.

urllib and http.client tidy a path or refuse an odd request line before it leaves,
so these requests are written byte for byte. One API process with the agent key and
a 1 s body timeout serves the whole module.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from tests.e2e.conftest import ROOT, drop_everything, free_port, http, stack_env, wait_for

pytestmark = pytest.mark.e2e

KEY = "secret"
BODY_TIMEOUT = 1.0
DEADLINE = 15.0  # for anything the server should do within a second or two


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Server:
    port: int
    log: Path

    def send(self, data: bytes) -> Answer:
        """Write ``data`` as is, then read until the server closes (or the deadline)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE) as conn:
            conn.sendall(data)
            return _read_until_closed(conn)


def _read_until_closed(conn: socket.socket) -> Answer:
    """Everything the server sends until it closes, within DEADLINE (recv's own timeout)."""
    received, closed = b"", False
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            break
        if not chunk:
            closed = True
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = (line.split(": ", 1) for line in lines[1:] if ": " in line)
    headers = {name.lower(): value for name, value in fields}
    status = int(lines[0].split()[1]) if lines[0] else 0
    return Answer(status, headers, body, closed)


def request(method: str, path: str, body: bytes = b"", key: str | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: tadpole", "Connection: close"]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if key is not None:
        lines.append(f"X-Orhestra-Key: {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    name = f"e2e{uuid4().hex[:8]}"
    port = free_port()
    env = stack_env(port, name)
    env.update(TADPOLE_AGENT_KEY=KEY, TADPOLE_BODY_TIMEOUT=str(BODY_TIMEOUT))
    log = tmp_path_factory.mktemp("api") / "api.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "api"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(
            lambda: http("GET", f"http://127.0.0.1:{port}/api/v1/health")[0] == 200,
            60,
            f"`tadpole api` to answer (log: {log})",
        )
        yield Server(port, log)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drop_everything(name)


HELLO = json.dumps({"ipAddress": "10.0.0.1"}).encode()


@pytest.mark.parametrize(
    "path",
    [
        "//internal/v1/hello",
        "///internal/v1/hello",
        "/internal//v1/hello",
        "/internal/v1/./hello",
        "/api/../internal/v1/hello",
        "/intern%61l/v1/hello",
        "/internal%2Fv1/hello",
        "/internal/v1/hello/",
    ],
)
def test_no_spelling_of_a_worker_path_registers_a_spot_without_the_key(
    server: Server, path: str
) -> None:
    refused = server.send(request("POST", path, HELLO))

    assert refused.status in (401, 404), refused
    assert refused.json()["success"] is False
    keyed = server.send(request("POST", path, HELLO, key=KEY))
    if keyed.status == 200:  # a spelling the router takes is a worker route: the key is needed
        assert refused.status == 401
        assert refused.json() == {
            "success": False,
            "error": "missing or wrong X-Orhestra-Key header",
        }
    else:
        assert keyed.status == 404


def test_the_doubled_slash_is_the_worker_route_itself(server: Server) -> None:
    keyed = server.send(request("POST", "//internal/v1/hello", HELLO, key=KEY))

    assert keyed.status == 200
    assert keyed.json()["spotId"].startswith("spot-")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"FOO /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n", "Invalid method"),
        (
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            "Content-Length",
        ),
        (
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\n{}",
            "Content-Length",
        ),
        (b"GET /api/v1/health HTTP/9.x\r\nHost: x\r\n\r\n", ""),
        (b"GET\r\n\r\n", ""),
    ],
)
def test_what_the_server_cannot_parse_is_a_json_400(
    server: Server, data: bytes, reason: str
) -> None:
    answer = server.send(data)

    assert answer.status == 400, answer
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["success"] is False
    assert body["error"].startswith("malformed HTTP request: ")
    assert reason in body["error"]
    assert answer.closed


@pytest.mark.parametrize("method", ["PURGE", "PROPFIND"])
def test_a_method_the_server_parses_but_falcon_lacks_is_a_json_405(
    server: Server, method: str
) -> None:
    answer = server.send(request(method, "/api/v1/health"))

    assert answer.status == 405
    assert answer.json() == {
        "success": False,
        "error": f"method {method} is not allowed on /api/v1/health",
    }
    assert answer.headers["allow"] == "GET, HEAD, OPTIONS"


def test_head_answers_the_get_headers_without_a_body(server: Server) -> None:
    got = server.send(request("GET", "/api/v1/health"))
    head = server.send(request("HEAD", "/api/v1/health"))

    assert (got.status, head.status) == (200, 200)
    assert head.body == b""
    assert head.headers["content-type"] == "application/json"
    assert int(head.headers["content-length"]) > 0


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/internal/v1/hello"])
def test_a_stalled_body_is_answered_408_and_the_connection_closed(
    server: Server, path: str
) -> None:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as conn:
        conn.sendall(
            head.encode() + f"X-Orhestra-Key: {KEY}\r\nContent-Length: 100\r\n\r\n".encode()
        )
        conn.sendall(b'{"jarPath": "/a.j')  # ... and nothing more

        answer = _read_until_closed(conn)

    assert answer.closed, "the server kept a stalled request's connection open"
    assert answer.status == 408
    assert answer.json() == {
        "success": False,
        "error": f"the request was not received within {BODY_TIMEOUT:g} s",
    }


def test_a_request_stalled_in_its_headers_is_dropped_too(server: Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as conn:
        conn.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Ty")

        answer = _read_until_closed(conn)

    assert answer.closed
    assert answer.status == 408


def test_a_stalled_body_already_refused_is_dropped(server: Server) -> None:
    """Refused at once (no key), its body never comes: the connection is dropped all the same."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as conn:
        conn.sendall(b"POST /internal/v1/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")

        answer = _read_until_closed(conn)

    assert answer.closed
    assert answer.status == 401


def test_a_whole_request_after_a_dropped_one_is_served(server: Server) -> None:
    with (
        contextlib.suppress(OSError),
        socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as conn,
    ):
        conn.sendall(b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\n{")
        _read_until_closed(conn)

    assert server.send(request("GET", "/api/v1/health")).status == 200


def test_a_stalled_request_behind_an_answered_one_gets_its_own_408(server: Server) -> None:
    """Pipelined: the first request is answered whole, then the stalled second one is a 408."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as conn:
        conn.sendall(
            b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"
        )

        received = _read_until_closed(conn)

    assert received.closed
    assert received.status == 200
    first, _, second = received.body.partition(b"HTTP/1.1 ")
    assert json.loads(first)["database"] == "connected"  # the health answer, whole
    assert second.startswith(b"408 ")
    assert second.endswith(b'"error":"the request was not received within 1 s"}')
