"""The saga runner's handlers and fault rules, with fakes for the hook's server."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pybreaker
import pytest

from sagas.client import Taken
from sagas.handlers import (
    BREAKER_FAILURES,
    Breaker,
    Faults,
    Handlers,
    HttpHook,
    Report,
)
from sagas.runner import PARTICIPANTS, SagaRunner, next_to_compensate


def taken(name: str = "register_with_mesh", **params: Any) -> Taken:
    return Taken(
        saga_id="saga-" + "1" * 32,
        kind="agent_spawning",
        step=name,
        compensation="deregister_from_mesh",
        fence=3,
        deadline=datetime.now(UTC) + timedelta(seconds=3),
        params={"targetId": "t1", **params},
        outcome=None,
        is_compensation=False,
    )


def hook(handler: Any, breaker: Breaker | None = None, attempts: int = 3) -> HttpHook:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return HttpHook(
        "http://hooks/step",
        client,
        breaker or Breaker("t"),
        attempts=attempts,
        base=0.001,
        most=0.002,
    )


async def test_a_hook_posts_the_step_and_its_answer_is_the_outcome() -> None:
    seen: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"registered": True})

    report = await hook(answer)(taken())
    assert report == Report(ok=True, outcome={"registered": True}, apply=True)
    assert seen[0]["step"] == "register_with_mesh" and seen[0]["fenceToken"] == 3
    assert seen[0]["params"]["targetId"] == "t1"


async def test_a_hook_retries_5xx_and_transport_errors_then_fails_the_step() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise httpx.ConnectError("refused")
        return httpx.Response(503)

    report = await hook(answer)(taken())
    assert calls == 3
    assert not report.ok and "failed 3 times" in report.error


async def test_a_hook_recovers_within_its_retries() -> None:
    answers = iter([httpx.Response(500), httpx.Response(200, json={"n": 1})])
    report = await hook(lambda request: next(answers))(taken())
    assert report.ok and report.outcome == {"n": 1}


async def test_a_4xx_is_not_retried() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(422)

    report = await hook(answer)(taken())
    assert calls == 1 and not report.ok and "422" in report.error


async def test_the_breaker_opens_after_five_failures_and_closes_after_two_successes() -> None:
    breaker = Breaker("t", recovery=0.05)
    failing = True
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(500 if failing else 200, json={})

    h = hook(answer, breaker, attempts=1)
    for _ in range(BREAKER_FAILURES):
        assert not (await h(taken())).ok
    assert breaker.state == pybreaker.STATE_OPEN
    before = calls
    refused = await h(taken())
    assert not refused.ok and calls == before  # open: the hook is not called
    await asyncio.sleep(0.06)
    failing = False
    assert (await h(taken())).ok
    assert breaker.state == pybreaker.STATE_HALF_OPEN  # one success is not enough
    assert (await h(taken())).ok
    assert breaker.state == pybreaker.STATE_CLOSED


async def test_a_half_open_breaker_lets_three_trials_through_at_once() -> None:
    breaker = Breaker("t", recovery=0.01)
    breaker.breaker.open()
    await asyncio.sleep(0.02)
    release = asyncio.Event()
    started = 0

    async def slow() -> str:
        nonlocal started
        started += 1
        await release.wait()
        return "ok"

    trials = [asyncio.ensure_future(breaker.call(slow)) for _ in range(3)]
    await asyncio.sleep(0.01)
    with pytest.raises(pybreaker.CircuitBreakerError):
        await asyncio.wait_for(breaker.call(slow), 1.0)  # a fourth would hang: no wait
    release.set()
    assert await asyncio.gather(*trials) == ["ok"] * 3
    assert started == 3


def test_hooks_come_from_the_setting_and_the_rest_is_built_in() -> None:
    client = httpx.AsyncClient()
    handlers = Handlers.from_setting('{"register_with_mesh": "http://h/r"}', client)
    assert isinstance(handlers["register_with_mesh"], HttpHook)
    assert handlers["reserve_resources"] is handlers.builtin
    with pytest.raises(ValueError):
        Handlers.from_setting('["http://h"]', client)


def test_fault_rules_match_step_and_params(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    faults = Faults(str(path))
    assert faults.action(taken()) is None  # no file: no faults
    rule = {"step": "register_with_mesh", "action": "fail", "match": {"targetId": "t1"}}
    path.write_text(json.dumps({"rules": [rule]}))
    assert faults.action(taken()) == "fail"
    assert faults.action(taken("reserve_resources")) is None
    assert faults.action(taken(targetId="t2")) is None
    nested = {"step": "register_with_mesh", "action": "hang", "match": {"caps.test": "x"}}
    path.write_text(json.dumps({"rules": [nested]}))
    path.touch()
    faults._stamp = None
    assert faults.action(taken(caps={"test": "x"})) == "hang"
    assert Faults("").action(taken()) is None


def test_each_participant_follows_the_one_before_it() -> None:
    first, second, third = PARTICIPANTS
    assert first.follows("Started", {}) and not second.follows("Started", {})
    assert second.follows("StepSucceeded", {"step": first.spec.name})
    assert third.follows("StepSucceeded", {"step": second.spec.name}) and third.final
    assert not third.follows("StepSucceeded", {"step": first.spec.name})


def test_the_next_compensation_is_read_from_the_event() -> None:
    assert next_to_compensate("CompensationStarted", {"steps": ["b", "a"]}) == "b"
    assert next_to_compensate("CompensationStarted", {"steps": []}) is None
    assert next_to_compensate("StepCompensated", {"remaining": ["a"]}) == "a"
    assert next_to_compensate("StepCompensated", {"remaining": []}) is None
    assert next_to_compensate("CompensationFailed", {"step": "a"}) == "a"


class FakeApi:
    """The API of one spawn saga whose steps are taken in order."""

    def __init__(self) -> None:
        self.finished: list[tuple[str, dict[str, Any]]] = []
        self.takes = 0
        self.steps = ["reserve_resources", "initialize_agent_state", "register_with_mesh"]

    async def take_step(self, saga: str, **declared: Any) -> Taken:
        from sagas.client import Refused

        self.takes += 1
        if not self.steps:
            raise Refused("no step to take")
        return taken(self.steps[0])

    async def finish_step(self, t: Taken, **report: Any) -> dict[str, Any]:
        self.finished.append((t.step, report))
        self.steps.pop(0)
        following = None
        if self.steps and report.get("takeNext"):  # the report takes the next step too
            nxt = taken(self.steps[0])
            following = {
                "sagaId": nxt.saga_id,
                "kind": nxt.kind,
                "step": nxt.step,
                "compensation": nxt.compensation,
                "fenceToken": nxt.fence,
                "deadline": nxt.deadline.isoformat(),
                "params": nxt.params,
                "outcome": None,
            }
        state = "COMPLETED" if not self.steps else "RUNNING"
        return {"sagaState": state, "stepState": "SUCCEEDED", "next": following}


async def test_the_orchestrator_takes_each_step_in_turn_and_reports_it_applied() -> None:
    api = FakeApi()
    runner = SagaRunner(api, Handlers())  # type: ignore[arg-type]
    await runner.drive("saga-" + "1" * 32)
    assert [name for name, _ in api.finished] == [
        "reserve_resources",
        "initialize_agent_state",
        "register_with_mesh",
    ]
    assert all(report["apply"] and report["ok"] for _, report in api.finished)
    assert api.takes == 1  # each report took the next step: one round trip a step


async def test_a_hanging_step_is_given_up_at_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "faults.json"
    path.write_text(json.dumps({"rules": [{"step": "reserve_resources", "action": "hang"}]}))
    api = FakeApi()
    runner = SagaRunner(api, Handlers(), Faults(str(path)))  # type: ignore[arg-type]
    soon = Taken(**{**taken("reserve_resources").__dict__, "deadline": datetime.now(UTC)})
    assert await runner.run_handler(soon, soon.deadline.timestamp() - 0.45) is None
