"""End-to-end fixtures: `tadpole up` as a user runs it, isolated by random names."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http(method: str, url: str, body: Any = None, timeout: float = 10) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, urllib.error.URLError):
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Stack:
    """One `tadpole up` process tree with its own schemas, Redis prefix and topics."""

    port: int
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        self.starts += 1
        out = self.log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"],
            env=self.env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(
            lambda: http("GET", self.base + "/api/v1/health")[0] == 200,
            timeout,
            f"`tadpole up` to answer (log: {self.log})",
        )

    def children(self) -> dict[str, int]:
        """pid of each supervised child, by role (api, relay, projector-postgres..., broker)."""
        assert self.process is not None
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat[1]) != self.process.pid:
                continue
            if b"gunicorn" in cmd:  # `tadpole api` execs gunicorn
                found["api"] = int(entry.name)
                continue
            if Path(cmd[0].decode()).name.startswith("tansu") and cmd[1:2] == [b"broker"]:
                found["broker"] = int(entry.name)  # the embedded broker, Tansu
                continue
            if b"service.cli" not in cmd:
                continue
            args = [c.decode() for c in cmd if c]
            role = args[args.index("service.cli") + 1]
            if role == "project":
                role = "projector-" + args[args.index("project") + 1]
            found[role] = int(entry.name)
        return found

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if sig == signal.SIGKILL:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Nothing of the old tree may survive (a stray child would keep the port).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def stack_env(port: int, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env.update(
        TADPOLE_PORT=str(port),
        TADPOLE_SCHEMA=f"{name}_store",
        TADPOLE_READ_SCHEMA=f"{name}_read",
        TADPOLE_REDIS_PREFIX=name,
        TADPOLE_TOPIC_PREFIX=name,
        TADPOLE_LOG_LEVEL="INFO",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Any]:
    stacks: list[Stack] = []

    def make(port: int | None = None) -> Stack:
        name = f"e2e{uuid4().hex[:8]}"
        port = port or free_port()
        stack = Stack(port=port, env=stack_env(port, name), log=tmp_path / f"{name}.log")
        stack.extra["name"] = name
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        drop_everything(stack.extra["name"])


def drop_everything(name: str) -> None:
    """Drop a stack's schemas, Redis keys (rebuild comparisons add suffixes too)."""
    import psycopg
    import redis

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
            (name + "%",),
        ).fetchall()
        for (schema,) in rows:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    client = redis.Redis()
    keys = list(client.scan_iter(match=name + "*", count=1000))
    if keys:
        client.delete(*keys)


def health(stack: Stack) -> dict[str, Any]:
    """GET /api/v1/health, which must answer 200."""
    status, body = http("GET", stack.base + "/api/v1/health")
    assert status == 200, body
    assert isinstance(body, dict)
    return body
