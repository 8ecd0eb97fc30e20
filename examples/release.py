"""The steps of docs/workflows.md's release workflow, as Python callables.

Each step is called by ``tadpole worker`` with the task's input — ``{"input": the
run's input, "tasks": {dependency: its output}}`` — and returns its output. A
step sleeps ``stepSeconds`` (default 1) so that there is time to pause a run.
"""

from __future__ import annotations

import time
from typing import Any


def _work(given: dict[str, Any]) -> dict[str, Any]:
    run_input: dict[str, Any] = given.get("input", {})
    time.sleep(float(run_input.get("stepSeconds", 1)))
    return run_input


def reserve(given: dict[str, Any]) -> dict[str, Any]:
    app = _work(given).get("app", "demo")
    return {"reservation": f"res-{app}"}


def provision(given: dict[str, Any]) -> dict[str, Any]:
    _work(given)
    return {"host": given["tasks"]["reserve"]["reservation"] + ".hosts.example"}


def deploy(given: dict[str, Any]) -> dict[str, Any]:
    run_input = _work(given)
    if run_input.get("failDeploy"):
        raise RuntimeError("deploy failed: the health check never passed")
    return {"url": "https://" + given["tasks"]["provision"]["host"]}


def notify(given: dict[str, Any]) -> dict[str, Any]:
    _work(given)
    return {"notified": given["tasks"]["deploy"]["url"]}


def undo(given: dict[str, Any]) -> dict[str, Any]:
    """Every compensation: it is given the output of the step it undoes."""
    _work(given)
    return {"undone": given.get("tasks", {})}
