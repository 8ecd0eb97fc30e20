"""The reference worker's protocol against a fake API (httpx's MockTransport): no network."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from service.worker import Worker, WorkerConfig, make_client

HERE = "tests.unit.test_worker_protocol"


def double(given: dict[str, Any]) -> dict[str, Any]:
    return {"doubled": given["input"]["n"] * 2}


async def forever(given: dict[str, Any]) -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


def workflow_task(task_id: str, callable_name: str, n: int = 1) -> dict[str, Any]:
    payload = {
        "kind": "workflow",
        "instanceId": "i-1",
        "workflow": {"namespace": "ns", "name": "w", "version": "1", "runId": "r"},
        "taskId": task_id,
        "attempt": 1,
        "payload": {"callable": f"{HERE}:{callable_name}"},
        "input": {"input": {"n": n}, "tasks": {}},
    }
    return {"id": f"wtask-1-{task_id}", "payload": orjson.dumps(payload).decode(), "fenceToken": 1}


class FakeApi:
    """Answers the worker routes; ``answers`` overrides a path's status, once per entry."""

    def __init__(self, tasks: list[dict[str, Any]]):
        self.tasks = tasks
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.answers: dict[str, list[int]] = {}
        self.spots = 0
        self.keys: set[str | None] = set()
        self.changed = asyncio.Event()

    def seen(self, suffix: str) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path.endswith(suffix)]

    async def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = orjson.loads(request.content or b"{}")
        self.requests.append((path, body))
        self.keys.add(request.headers.get("X-Orhestra-Key"))
        self.changed.set()
        forced = self.answers.get(path.rsplit("/", 1)[-1])
        if forced:
            return httpx.Response(forced.pop(0), json={"success": False, "error": "forced"})
        if path.endswith("/hello"):
            self.spots += 1
            return httpx.Response(200, json={"spotId": f"spot-{self.spots}"})
        if path.endswith("/claim"):
            if not self.tasks:
                await asyncio.sleep(0.02)  # a short long poll
                return httpx.Response(200, json={"tasks": []})
            taken, self.tasks = self.tasks[: body["maxTasks"]], self.tasks[body["maxTasks"] :]
            return httpx.Response(200, json={"tasks": taken})
        if path.endswith("/renew"):
            return httpx.Response(200, json={"success": True})
        answer: dict[str, Any] = {"success": True}
        if path.endswith("/fail"):
            answer["willRetry"] = True
        if body.get("claimNext"):  # a report that also claims, as the API answers it
            n = body["claimNext"]
            answer["tasks"], self.tasks = self.tasks[:n], self.tasks[n:]
        return httpx.Response(200, json=answer)

    async def until(self, condition: Callable[[], Any], timeout: float = 5.0) -> Any:
        async def wait() -> Any:
            while not (found := condition()):
                self.changed.clear()
                await self.changed.wait()
            return found

        return await asyncio.wait_for(wait(), timeout)


def worker(api: FakeApi, **config: Any) -> Worker:
    settings = {"heartbeat_every": 0.02, "renew_every": 0.05, "grace": 5.0, **config}
    config = WorkerConfig(url="http://api", **settings)
    return Worker(config, make_client(config, httpx.MockTransport(api.handle)), signals=False)


async def test_a_claimed_callable_task_is_completed_with_its_output() -> None:
    api = FakeApi([workflow_task("a", "double", n=21)])
    w = worker(api, key="k")
    running = asyncio.ensure_future(w.run())
    (done,) = await api.until(lambda: api.seen("/wtask-1-a/complete"))
    assert done == {"spotId": "spot-1", "fenceToken": 1, "output": {"doubled": 42}, "claimNext": 1}
    w.stop()
    assert await running == 0
    hello = api.requests[0]
    assert hello[0] == "/internal/v1/hello" and "ipAddress" in hello[1]
    assert api.seen("/claim")[0] == {"spotId": "spot-1", "maxTasks": 1, "waitMs": 30000}
    assert api.keys == {"k"}  # on every request


async def test_a_report_claims_the_next_task_for_the_slot_it_frees_and_runs_it() -> None:
    api = FakeApi([workflow_task("a", "double", n=1), workflow_task("b", "double", n=2)])
    w = worker(api)  # concurrency 1: the claim takes a, the report of a takes b
    running = asyncio.ensure_future(w.run())
    (done,) = await api.until(lambda: api.seen("/wtask-1-b/complete"))
    assert done["output"] == {"doubled": 4}
    assert [len(api.seen(f"/wtask-1-{t}/complete")) for t in "ab"] == [1, 1]
    w.stop()
    assert await running == 0
    assert api.seen("/wtask-1-a/complete")[0]["claimNext"] == 1


async def test_a_heartbeat_answered_404_registers_again_and_claims_as_the_new_spot() -> None:
    api = FakeApi([])
    api.answers["heartbeat"] = [404]
    w = worker(api)
    running = asyncio.ensure_future(w.run())
    await api.until(lambda: any(c["spotId"] == "spot-2" for c in api.seen("/claim")))
    assert len(api.seen("/hello")) == 2
    w.stop()
    assert await running == 0


async def test_a_refused_renewal_stops_the_work_and_reports_nothing() -> None:
    api = FakeApi([workflow_task("a", "forever")])
    api.answers["renew"] = [409]
    w = worker(api)
    running = asyncio.ensure_future(w.run())
    await api.until(lambda: api.seen("/renew"))
    await api.until(lambda: not w.held)  # the task's work ended
    w.stop()
    assert await running == 0
    assert not api.seen("/complete") and not api.seen("/fail")


async def test_a_stop_gives_back_what_outlives_the_grace_and_claims_no_more() -> None:
    api = FakeApi([workflow_task("a", "forever")])
    w = worker(api, grace=0.1)
    running = asyncio.ensure_future(w.run())
    await api.until(lambda: w.held)
    claims = len(api.seen("/claim"))
    w.stop()
    assert await asyncio.wait_for(running, 5) == 0
    (failed,) = api.seen("/wtask-1-a/fail")
    assert failed["retriable"] is True and "given back" in failed["error"]
    assert len(api.seen("/claim")) == claims


async def test_connection_errors_are_waited_out_with_growing_pauses() -> None:
    api = FakeApi([workflow_task("a", "double")])
    attempts: list[float] = []

    async def flaky(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/hello") and len(attempts) < 3:
            attempts.append(asyncio.get_running_loop().time())
            raise httpx.ConnectError("refused")
        return await api.handle(request)

    config = WorkerConfig(url="http://api", heartbeat_every=0.02)
    w = Worker(config, make_client(config, httpx.MockTransport(flaky)), signals=False)
    running = asyncio.ensure_future(w.run())
    await api.until(lambda: api.seen("/complete"))
    w.stop()
    assert await running == 0
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert 0.15 < gaps[0] < gaps[1]  # 0.2 s, then 0.4 s (±20%)


async def test_a_refused_key_ends_the_worker_with_status_2() -> None:
    api = FakeApi([])
    api.answers["hello"] = [401]
    assert await worker(api).run() == 2
