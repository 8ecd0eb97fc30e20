"""Health that tells the truth, and reads that survive a Redis that lost its keys."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest
import redis

from tests.e2e.conftest import Stack, health, http, wait_for
from tests.e2e.fleet import sweep

pytestmark = pytest.mark.e2e


def test_health_is_degraded_while_the_relay_is_stopped_and_healthy_once_it_resumes(
    make_stack: Any,
) -> None:
    stack: Stack = make_stack()
    stack.env["TADPOLE_DEGRADED_LAG"] = "1"
    stack.start()
    assert http("GET", stack.base + "/ready")[0] == 200
    wait_for(lambda: health(stack)["status"] == "healthy", 30, "a healthy idle stack")

    relay = stack.children()["relay"]
    os.kill(relay, signal.SIGSTOP)
    try:
        status, body = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.9.9.9"})
        assert status == 200, body
        degraded = wait_for(
            lambda: (h := health(stack))["status"] == "degraded" and h,
            30,
            "health to say degraded while the relay is stopped",
        )
        assert degraded["pipeline"]["relay"]["behindEvents"] >= 1
        assert degraded["pipeline"]["relay"]["behindSeconds"] > 1
        assert any(p.startswith("relay is") for p in degraded["problems"])
    finally:
        os.kill(relay, signal.SIGCONT)
    healthy = wait_for(
        lambda: (h := health(stack))["status"] == "healthy" and h,
        30,
        "health to say healthy once the relay resumed",
    )
    assert healthy["pipeline"]["relay"]["behindEvents"] == 0


def test_reads_through_a_redis_that_lost_its_keys_never_404_or_500(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start()
    status, created = http("POST", stack.base + "/api/v1/jobs", sweep(4))
    assert status == 201, created
    job = created["jobId"]
    _, spot = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.1"})
    _, claimed = http(
        "POST", stack.base + "/internal/v1/tasks/claim", {"spotId": spot["spotId"], "maxTasks": 3}
    )
    for task in claimed["tasks"]:
        status, _ = http(
            "POST",
            f"{stack.base}/internal/v1/tasks/{task['id']}/complete",
            {
                "spotId": spot["spotId"],
                "fopt": 0.5,
                "runtimeMs": 10,
                "fenceToken": task["fenceToken"],
            },
        )
        assert status == 200
    expected = {"status": "RUNNING", "totalTasks": 4, "completedTasks": 3, "failedTasks": 0}

    def shown() -> dict[str, Any]:
        status, body = http("GET", f"{stack.base}/api/v1/jobs/{job}")
        assert status == 200, (status, body)  # never 404 or 500 for a job that exists
        return {k: body[k] for k in expected}

    wait_for(lambda: shown() == expected, 30, "the job's counts")
    prefix = stack.extra["name"]
    client = redis.Redis()
    projector = stack.children()["projector-redis"]
    # Stopped, the projector cannot rebuild: every read below meets the empty Redis.
    os.kill(projector, signal.SIGSTOP)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        assert keys
        client.delete(*keys)  # as a Redis restarted empty would be
        assert shown() == expected  # from PostgreSQL
        h = health(stack)
        assert (h["database"], h["redis"], h["status"]) == ("connected", "rebuilding", "degraded")
        assert (h["activeSpots"], h["runningTasks"], h["pendingTasks"]) == (1, 0, 1)
    finally:
        os.kill(projector, signal.SIGCONT)
    try:
        wait_for(
            lambda: (
                health(stack)["redis"] == "connected" and client.exists(f"{prefix}:job:{job}") == 1
            ),
            30,
            "Redis to be rebuilt",
        )
    finally:
        client.close()
    assert shown() == expected  # from Redis again
