"""Infrastructure faults against servers of the test's own: a Redis killed and
restarted empty, a PostgreSQL restarted and crashed.

Each test starts its own Redis or PostgreSQL server on a free port (the
machine's binaries, the test's temporary directory), so it can kill and restart
it without touching the servers the machine and other tests use.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.e2e.conftest import Stack, free_port, http, wait_for
from tests.e2e.fleet import sweep

pytestmark = pytest.mark.e2e

REDIS_SERVER = shutil.which("redis-server")


class OwnRedis:
    """A memory-only Redis on a free port, killed and started again at will."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        try:
            wait_for(answers, 10, "our Redis to answer")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary on this machine")
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


def health(stack: Stack) -> dict[str, Any]:
    status, body = http("GET", stack.base + "/api/v1/health")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def test_a_redis_killed_and_restarted_empty_never_breaks_a_read(
    make_stack: Any, own_redis: OwnRedis
) -> None:
    stack: Stack = make_stack()
    stack.env["REDIS_URL"] = own_redis.url
    stack.start()
    status, created = http("POST", stack.base + "/api/v1/jobs", sweep(4))
    assert status == 201, created
    job = created["jobId"]
    _, spot = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.1"})
    _, claimed = http(
        "POST", stack.base + "/internal/v1/tasks/claim", {"spotId": spot["spotId"], "maxTasks": 3}
    )
    for task in claimed["tasks"]:
        body = {"spotId": spot["spotId"], "fopt": 0.5, "fenceToken": task["fenceToken"]}
        assert http("POST", f"{stack.base}/internal/v1/tasks/{task['id']}/complete", body)[0] == 200
    expected = {"status": "RUNNING", "totalTasks": 4, "completedTasks": 3, "failedTasks": 0}

    def shown() -> dict[str, Any]:
        status, body = http("GET", f"{stack.base}/api/v1/jobs/{job}")
        assert status == 200, (status, body)  # never 404 or 500 for a job that exists
        return {k: body[k] for k in expected}

    wait_for(lambda: shown() == expected, 30, "the job's counts")

    own_redis.kill()
    assert shown() == expected  # from PostgreSQL
    down = health(stack)
    assert (down["database"], down["redis"], down["status"]) == (
        "connected",
        "disconnected",
        "degraded",
    )
    assert (down["activeSpots"], down["runningTasks"], down["pendingTasks"]) == (1, 0, 1)
    # a command while Redis is down is stored, and shows once it is back
    assert http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.2"})[0] == 200

    own_redis.start()  # empty: this Redis keeps nothing
    seen: list[dict[str, Any]] = []

    def back() -> bool:
        seen.append(shown())
        h = health(stack)
        return h["redis"] == "connected" and h["activeSpots"] == 2

    wait_for(back, 60, "Redis to be rebuilt with the spot stored while it was down")
    assert all(s == expected for s in seen), seen
    client = redis.Redis.from_url(own_redis.url)
    with contextlib.closing(client):
        assert client.exists(f"{stack.extra['name']}:job:{job}") == 1  # rebuilt, not PG
    assert shown() == expected
