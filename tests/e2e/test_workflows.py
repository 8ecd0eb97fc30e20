"""Workflows (seed 002) against the real stack: `tadpole up`, over HTTP."""

from __future__ import annotations

import signal
import threading
from collections import Counter
from typing import Any

from tests.e2e.conftest import Stack, http, wait_for


def definition(
    name: str = "release", *, timeout: float | None = None, retry: dict[str, Any] | None = None
) -> dict[str, Any]:
    """reserve → provision → deploy, each with a compensation."""
    tasks, previous = [], []
    for step in ("reserve", "provision", "deploy"):
        tasks.append(
            {
                "id": step,
                "dependsOn": previous,
                "payload": {"step": step, "region": "${input.region}"},
                "retry": retry or {"maxAttempts": 3, "backoffSeconds": 1},
                "timeoutSeconds": timeout,
                "compensation": {"payload": {"undo": step}},
            }
        )
        previous = [step]
    return {"namespace": "ops", "name": name, "version": "1", "tasks": tasks}


def hello(stack: Stack) -> str:
    status, body = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.1.0.1"})
    assert status == 200, body
    spot: str = body["spotId"]
    return spot


def claim(stack: Stack, spot: str, wait_ms: int = 0, n: int = 1) -> list[dict[str, Any]]:
    status, body = http(
        "POST",
        stack.base + "/internal/v1/tasks/claim",
        {"spotId": spot, "maxTasks": n, "waitMs": wait_ms},
        timeout=40,
    )
    assert status == 200, body
    tasks: list[dict[str, Any]] = body["tasks"]
    return tasks


def report(
    stack: Stack, task: dict[str, Any], spot: str, verb: str = "complete", **body: Any
) -> tuple[int, Any]:
    return http(
        "POST",
        f"{stack.base}/internal/v1/tasks/{task['id']}/{verb}",
        {"spotId": spot, "fenceToken": task["fenceToken"], **body},
    )


def run_of(stack: Stack, instance: str) -> dict[str, Any]:
    status, body = http("GET", f"{stack.base}/api/v1/workflow-runs/{instance}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def start(stack: Stack, run_id: str, name: str = "release") -> tuple[int, str]:
    status, body = http(
        "POST",
        f"{stack.base}/api/v1/workflows/ops/{name}/runs",
        {"runId": run_id, "input": {"region": "eu"}},
    )
    assert status in (200, 201), body
    return status, body["instanceId"]


def test_definitions_runs_racing_workers_and_control_over_http(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start()
    url = stack.base + "/api/v1/workflows"
    assert http("POST", url, definition())[0] == 201
    assert http("POST", url, definition())[0] == 200
    other = definition()
    other["tasks"][0]["payload"] = {"changed": True}
    assert http("POST", url, other)[0] == 409
    cyclic = definition("cyclic")
    cyclic["tasks"][0]["dependsOn"] = ["deploy"]
    status, body = http("POST", url, cyclic)
    assert (status, body["error"]) == (
        422,
        "the dependencies form a cycle: reserve -> deploy -> provision -> reserve",
    )

    # Duplicate concurrent starts give one run.
    answers: list[tuple[int, str]] = []
    threads = [
        threading.Thread(target=lambda: answers.append(start(stack, "dup"))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({i for _, i in answers}) == 1
    assert sorted(s for s, _ in answers) == [200] * 7 + [201]

    # Many workers race for the tasks of ten runs: each task is completed once.
    instances = [start(stack, f"race-{n}")[1] for n in range(10)]
    completed: Counter[str] = Counter()
    refused: list[Any] = []

    def worker() -> None:
        spot = hello(stack)
        while not all(run_of(stack, i)["state"] == "COMPLETED" for i in instances):
            for task in claim(stack, spot, wait_ms=500, n=2):
                status, body = report(stack, task, spot, output={"by": spot})
                if status == 200:
                    completed[task["id"]] += 1
                else:
                    refused.append(body)

    workers = [threading.Thread(target=worker) for _ in range(6)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert not refused
    for instance in instances:
        run = run_of(stack, instance)
        assert run["state"] == "COMPLETED"
        assert [(t["taskId"], t["attempts"]) for t in run["tasks"]] == [
            ("reserve", 1),
            ("provision", 1),
            ("deploy", 1),
        ]
        for task in run["tasks"]:
            assert completed[task["id"]] == 1
        status, audit = http("GET", f"{stack.base}/api/v1/audit/workflow-run/{instance}/events")
        assert status == 200
        assert [e["type"] for e in audit["events"]].count("WorkflowRun.TaskCompleted") == 3

    # Pause, resume, cancel; a report after the cancel is refused.
    _, paused = start(stack, "paused")
    assert http("POST", f"{stack.base}/api/v1/workflow-runs/{paused}/pause", {})[0] == 200
    spot = hello(stack)
    assert claim(stack, spot) == []
    assert http("POST", f"{stack.base}/api/v1/workflow-runs/{paused}/resume", {})[0] == 200
    (task,) = claim(stack, spot)
    assert http("POST", f"{stack.base}/api/v1/workflow-runs/{paused}/cancel", {})[0] == 200
    assert report(stack, task, spot, "renew")[0] == 409
    assert report(stack, task, spot)[0] == 409
    assert run_of(stack, paused)["state"] == "CANCELLED"

    # Compensation from a task: the completed tasks' compensations, in reverse order.
    _, undone = start(stack, "undone")
    for _ in range(2):
        (task,) = claim(stack, spot)
        assert report(stack, task, spot)[0] == 200
    status, _ = http(
        "POST",
        f"{stack.base}/api/v1/workflow-runs/{undone}/compensate",
        {"fromTaskId": "provision"},
    )
    assert status == 200
    order = []
    while run_of(stack, undone)["state"] == "COMPENSATING":
        for task in claim(stack, spot, wait_ms=1000):
            order.append(task["id"].rsplit("-", 1)[1])
            assert report(stack, task, spot)[0] == 200
    assert order == ["provision~compensate", "reserve~compensate"]
    assert run_of(stack, undone)["state"] == "COMPENSATED"


def test_a_worker_that_goes_silent_loses_its_lease_to_a_waiting_worker(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.env["TADPOLE_LEASE_SECONDS"] = "2"
    stack.start()
    assert http("POST", stack.base + "/api/v1/workflows", definition())[0] == 201
    _, instance = start(stack, "lost")
    silent, waiting = hello(stack), hello(stack)
    (task,) = claim(stack, silent)
    # The waiting worker's long poll answers once the lease ran out and the backoff passed.
    got = wait_for(lambda: claim(stack, waiting, wait_ms=5000), 30, "the task to come back")
    assert got[0]["id"] == task["id"] and got[0]["fenceToken"] == task["fenceToken"] + 1
    assert report(stack, task, silent)[0] == 409  # the old lease is gone
    assert report(stack, got[0], waiting)[0] == 200
    reserve = run_of(stack, instance)["tasks"][0]
    assert (reserve["state"], reserve["attempts"]) == ("DONE", 2)


def test_a_timeout_and_a_backoff_fire_after_kill_9_of_the_whole_stack(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start()
    assert http("POST", stack.base + "/api/v1/workflows", definition(timeout=3))[0] == 201
    _, instance = start(stack, "timer")
    spot = hello(stack)
    (task,) = claim(stack, spot)
    stack.stop(signal.SIGKILL)  # the timeout is due while everything is down
    stack.start()
    wait_for(
        lambda: run_of(stack, instance)["tasks"][0]["error"] == "timeout",
        30,
        "the timeout to fire after the restart",
    )
    spot = hello(stack)
    (again,) = wait_for(lambda: claim(stack, spot, wait_ms=3000), 30, "the retry after backoff")
    assert again["fenceToken"] == task["fenceToken"] + 1
    assert report(stack, again, spot, "fail", error="flaky", retriable=True)[1]["willRetry"]
    stack.stop(signal.SIGKILL)  # now a backoff is running
    stack.start()
    spot = hello(stack)
    (third,) = wait_for(lambda: claim(stack, spot, wait_ms=3000), 30, "the retry after backoff")
    assert third["fenceToken"] == again["fenceToken"] + 1
    status, audit = http("GET", f"{stack.base}/api/v1/audit/workflow-task/{task['id']}/events")
    assert status == 200
    errors = [
        e["data"]["error"] for e in audit["events"] if e["type"] == "WorkflowRun.AttemptFailed"
    ]
    assert errors == ["timeout", "flaky"]  # each fired once
