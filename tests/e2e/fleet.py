"""A small fleet of spots driving the worker API from threads, and store-history checks."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http import client as http_client
from typing import Any

from tests.e2e.conftest import http

#: What a request may raise when the stack is killed under it (a refused or
#: reset connection, an answer cut short mid-body).
TRANSPORT = (OSError, http_client.HTTPException, ValueError)


def sweep(tasks: int) -> dict[str, Any]:
    return {
        "jarPath": "/e2e/noop.jar",
        "mainClass": "e2e.Noop",
        "algorithms": ["NOOP"],
        "iterations": {"min": 1, "max": tasks, "step": 1},
        "agents": {"min": 1, "max": 1, "step": 1},
        "dimension": {"min": 1, "max": 1, "step": 1},
    }


@dataclass
class Fleet:
    """Spots that claim and complete until told to stop; remembers every acknowledged complete."""

    base: str
    spots: int = 6
    acknowledged: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for _ in range(self.spots):
            thread = threading.Thread(target=self._spot, daemon=True)
            thread.start()
            self._threads.append(thread)

    def join(self, timeout: float = 30) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _spot(self) -> None:
        spot_id: str | None = None
        while not self.stop.is_set():
            try:
                if spot_id is None:
                    status, body = http(
                        "POST",
                        self.base + "/internal/v1/hello",
                        {"ipAddress": "127.0.0.1"},
                        timeout=5,
                    )
                    if status != 200:
                        continue
                    spot_id = body["spotId"]
                http("POST", self.base + "/internal/v1/heartbeat", {"spotId": spot_id}, timeout=5)
                status, body = http(
                    "POST",
                    self.base + "/internal/v1/tasks/claim",
                    {"spotId": spot_id, "maxTasks": 5},
                    timeout=5,
                )
                if status == 404:
                    spot_id = None  # the stack lost us? register again
                    continue
                if status != 200:
                    self.stop.wait(0.1)  # (a 503 while the store is away)
                    continue
                for task in body["tasks"]:
                    self._complete(spot_id, task)
            except TRANSPORT as error:  # the stack is down: register again once it is back
                self.errors.append(str(error))
                spot_id = None
                self.stop.wait(0.2)

    def _complete(self, spot_id: str, task: dict[str, Any]) -> None:
        """Report until the coordinator answers, as a real worker would."""
        body = {"spotId": spot_id, "fopt": 0.5, "runtimeMs": 1, "fenceToken": task["fenceToken"]}
        for _ in range(300):
            try:
                status, answer = http(
                    "POST", f"{self.base}/internal/v1/tasks/{task['id']}/complete", body, timeout=5
                )
            except TRANSPORT as error:  # a stop cut the answer: ask again
                self.errors.append(str(error))
                self.stop.wait(0.2)
                continue
            if status == 503:  # the store is away for a moment: a worker asks again
                self.stop.wait(0.2)
                continue
            # "already completed" answers a retry whose first answer was lost in a stop.
            if status == 200 and answer.get("message") in (None, "already completed"):
                with self._lock:
                    self.acknowledged.add(task["id"])
            return


def lease_violations(events: list[Any]) -> list[str]:
    """Replay TaskBlock events: a claim of a RUNNING task, or a fence that did not grow by one."""
    state: dict[tuple[str, int], tuple[str, str | None, int]] = {}
    problems: list[str] = []
    for e in events:
        kind = type(e).__qualname__
        if not kind.startswith("TaskBlock.") or kind == "TaskBlock.Created":
            continue
        for n, index in enumerate(e.indexes):
            key = (e.job_id, index)
            status, holder, fence = state.get(key, ("NEW", None, 0))
            if kind == "TaskBlock.Claimed":
                if status != "NEW":
                    problems.append(
                        f"{key} claimed by {e.holders[n]} while {status} under {holder}"
                    )
                if e.fences[n] != fence + 1:
                    problems.append(f"{key} fence {e.fences[n]} after {fence}")
                state[key] = ("RUNNING", e.holders[n], e.fences[n])
            else:
                if status != "RUNNING" or holder != e.holders[n]:
                    problems.append(f"{key} {kind} by {e.holders[n]} while {status} under {holder}")
                retried = getattr(e, "retried", [False] * len(e.indexes))[n]
                done = "DONE" if kind == "TaskBlock.Completed" else "FAILED"
                state[key] = ("NEW" if retried else done, None, fence)
    return problems
