"""docs/workflows.md as written: its definition, run by two reference workers against the stack."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.e2e.conftest import Stack, http, wait_for
from tests.e2e.test_worker import start_worker  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]
DEFINITION = json.loads((ROOT / "docs/examples/release.json").read_text())
RUNS = "/api/v1/workflows/ops/release/runs"


def start(stack: Stack, run_id: str, given: dict[str, Any]) -> str:
    status, body = http("POST", stack.base + RUNS, {"runId": run_id, "input": given})
    assert status == 201, body
    instance: str = body["instanceId"]
    return instance


def run_of(stack: Stack, instance: str) -> dict[str, Any]:
    status, body = http("GET", f"{stack.base}/api/v1/workflow-runs/{instance}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def state_becomes(stack: Stack, instance: str, state: str, timeout: float = 60) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        lambda: (lambda r: r if r["state"] == state else None)(run_of(stack, instance)),
        timeout,
        f"run {instance} to be {state}",
    )
    return found


def test_the_docs_example_runs_as_written(make_stack: Any, start_worker: Any) -> None:  # noqa: F811
    stack: Stack = make_stack()
    stack.start()
    start_worker(stack, "--concurrency", "2")
    start_worker(stack, "--concurrency", "2")
    assert http("POST", stack.base + "/api/v1/workflows", DEFINITION)[0] == 201
    assert http("POST", stack.base + "/api/v1/workflows", DEFINITION)[0] == 200

    # 3. Run it: each step gets what the one before produced.
    first = start(stack, "release-42", {"app": "shop", "stepSeconds": 0})
    again = http("POST", stack.base + RUNS, {"runId": "release-42", "input": {}})
    assert again[0] == 200 and again[1]["instanceId"] == first
    done = state_becomes(stack, first, "COMPLETED")
    outputs = {t["taskId"]: t["output"] for t in done["tasks"]}
    assert outputs["reserve"] == {"reservation": "res-shop"}
    assert outputs["deploy"] == {"url": "https://res-shop.hosts.example"}
    assert outputs["notify"] == {"notified": "https://res-shop.hosts.example"}

    # 4. Pause while a step runs: nothing new is handed out; resume and it goes on.
    paused = start(stack, "release-43", {"app": "shop", "stepSeconds": 1})
    wait_for(lambda: run_of(stack, paused)["tasks"][0]["state"] == "RUNNING", 30, "a step")
    assert http("POST", f"{stack.base}/api/v1/workflow-runs/{paused}/pause")[0] == 200
    held = wait_for(
        lambda: (lambda r: r if r["tasks"][0]["state"] == "DONE" else None)(run_of(stack, paused)),
        30,
        "the running step to finish",
    )
    assert held["state"] == "PAUSED" and held["tasks"][1]["state"] == "READY"
    assert http("POST", f"{stack.base}/api/v1/workflow-runs/{paused}/resume")[0] == 200
    state_becomes(stack, paused, "COMPLETED")

    # 5. Compensate from provision: provision's, then reserve's compensation.
    status, _ = http(
        "POST",
        f"{stack.base}/api/v1/workflow-runs/{paused}/compensate",
        {"fromTaskId": "provision"},
    )
    assert status == 200
    undone = state_becomes(stack, paused, "COMPENSATED")
    compensations = [t for t in undone["tasks"] if t["taskId"].endswith("~compensate")]
    assert [t["taskId"] for t in compensations] == ["provision~compensate", "reserve~compensate"]
    assert all(t["state"] == "DONE" for t in compensations)

    # A deploy that fails both its attempts undoes provision and reserve by itself.
    failing = start(stack, "release-44", {"app": "shop", "stepSeconds": 0, "failDeploy": True})
    failed = state_becomes(stack, failing, "COMPENSATED")
    by_id = {t["taskId"]: t for t in failed["tasks"]}
    assert by_id["deploy"]["state"] == "FAILED" and by_id["deploy"]["attempts"] == 2
    assert by_id["notify"]["state"] == "SKIPPED"

    # 6. Its history, from the event store.
    status, audit = http("GET", f"{stack.base}/api/v1/audit/workflow-run/{paused}/events")
    assert status == 200
    types = [e["type"] for e in audit["events"]]
    assert "WorkflowRun.Paused" in types and "WorkflowRun.CompensationStarted" in types
