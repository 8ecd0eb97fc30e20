"""Workflows (seed 002) on the command side: definitions, runs, leases, timers, compensation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from domain.family import ConflictError, NotFoundError, Ok, Reaped
from domain.processor import CommandProcessor
from domain.spots import Claimed, ClaimTasks, Hello, ReapSpots, SpotRegistered
from domain.workflows import (
    CancelRun,
    CompensateRun,
    CompleteWorkflowTask,
    Definition,
    DefinitionError,
    FailWorkflowTask,
    FireTimers,
    LeaseExtended,
    OpenRuns,
    PauseRun,
    RegisterWorkflow,
    RenewLease,
    ResumeRun,
    RetryWorkflowTask,
    RunStarted,
    StartRun,
    TaskReported,
    WorkflowRegistered,
    WorkflowRun,
)
from domain.workflows.definitions import Retry
from domain.workflows.ids import workflow_task_id
from eventstore.store import StorePort, TadpoleStore, memory_env

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def chain(
    *,
    compensate: bool = True,
    retry: dict[str, Any] | None = None,
    timeout: float | None = None,
    version: str = "1",
) -> Definition:
    """reserve → provision → deploy, each with a compensation."""
    tasks = []
    previous: list[str] = []
    for name in ("reserve", "provision", "deploy"):
        tasks.append(
            {
                "id": name,
                "dependsOn": previous,
                "payload": {
                    "step": name,
                    "region": "${input.region}",
                    "got": "${tasks.reserve.id}",
                },
                "retry": retry or {"maxAttempts": 2, "backoffSeconds": 1},
                "timeoutSeconds": timeout,
                "compensation": {"payload": {"undo": name}},
            }
        )
        previous = [name]
    return Definition.from_dict(
        {
            "namespace": "ops",
            "name": "release",
            "version": version,
            "tasks": tasks,
            "compensateOnFailure": compensate,
        }
    )


@dataclass
class World:
    store: TadpoleStore = field(default_factory=lambda: TadpoleStore(memory_env()))
    processor: CommandProcessor = field(init=False)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> CommandProcessor:
        self.processor = CommandProcessor(StorePort(self.store), 3, 5.0)
        self.processor.recover(T0)
        self.processor.state(OpenRuns).jitter = lambda: 0.0
        return self.processor

    def one(self, command: Any, now: datetime = T0) -> Any:
        (result,) = self.processor.process([command], now)
        return result

    def spot(self) -> str:
        result = self.one(Hello("10.0.0.9"))
        assert isinstance(result, SpotRegistered)
        return result.spot_id

    def run(
        self,
        definition: Definition | None = None,
        run_id: str = "r1",
        input: dict[str, Any] | None = None,
    ) -> UUID:
        d = definition or chain()
        assert isinstance(self.one(RegisterWorkflow(d)), WorkflowRegistered)
        started = self.one(
            StartRun(d.namespace, d.name, run_id, json.dumps(input or {"region": "eu"}))
        )
        assert isinstance(started, RunStarted)
        return started.instance_id

    def claim(self, spot: str, n: int = 1, now: datetime = T0) -> list[Any]:
        result = self.one(ClaimTasks(spot, n), now)
        assert isinstance(result, Claimed), result
        return result.tasks

    def complete(
        self, task: Any, spot: str, output: dict[str, Any] | None = None, now: datetime = T0
    ) -> Any:
        return self.one(
            CompleteWorkflowTask(task.task_id, spot, task.fence, json.dumps(output or {"id": 7})),
            now,
        )

    def stored(self, run: UUID) -> WorkflowRun:
        loaded = self.store.load(run)
        assert isinstance(loaded, WorkflowRun)
        return loaded


# ---- definitions ---------------------------------------------------------------------


def defn(tasks: list[dict[str, Any]]) -> Definition:
    return Definition.from_dict({"namespace": "n", "name": "w", "version": "1", "tasks": tasks})


@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ([], "tasks must list at least one task"),
        ([{"id": "a"}, {"id": "a"}], "task id 'a' appears more than once"),
        ([{"id": "a", "dependsOn": ["b"]}], "task 'a' depends on unknown task 'b'"),
        (
            [
                {"id": "a", "dependsOn": ["c"]},
                {"id": "b", "dependsOn": ["a"]},
                {"id": "c", "dependsOn": ["b"]},
            ],
            "the dependencies form a cycle: a -> c -> b -> a",
        ),
        ([{"id": "a", "dependsOn": ["a"]}], "the dependencies form a cycle: a -> a"),
        ([{"id": "a b"}], "task id 'a b' must be 1-64 of A-Z, a-z, 0-9, '_', '.' and '-'"),
        (
            [{"id": "a", "timeoutSeconds": 1e308}],
            "task 'a': timeoutSeconds must be above 0 and at most 604800",
        ),
        (
            [{"id": "a", "retry": {"backoffSeconds": 1e300}}],
            "task 'a': retry.backoffSeconds must be 0 to 3600",
        ),
        (
            [{"id": "a", "retry": {"maxAttempts": 2**63}}],
            "task 'a': retry.maxAttempts must be 1 to 100",
        ),
    ],
)
def test_an_invalid_definition_says_what_is_wrong(
    tasks: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(DefinitionError) as refused:
        defn(tasks).check()
    assert str(refused.value) == message


def test_a_registered_version_is_immutable_and_registering_it_again_is_idempotent() -> None:
    world = World()
    assert world.one(RegisterWorkflow(chain())) == WorkflowRegistered("ops", "release", "1", True)
    assert world.one(RegisterWorkflow(chain())) == WorkflowRegistered("ops", "release", "1", False)
    other = world.one(RegisterWorkflow(chain(compensate=False)))
    assert isinstance(other, ConflictError) and "immutable" in str(other)
    assert world.one(RegisterWorkflow(chain(version="2"))).created


def test_retry_backoff_is_exponential_capped_and_jittered() -> None:
    policy = Retry(max_attempts=9, backoff_seconds=1.0)
    assert [policy.delay(n, 0.999999) for n in (1, 2, 3, 4, 5)] == pytest.approx([1, 2, 4, 8, 10])
    assert policy.delay(3, 0.0) == 2.0  # half fixed, half random


# ---- runs ------------------------------------------------------------------------------


def test_the_same_run_id_gives_the_same_run_even_in_one_batch() -> None:
    world = World()
    world.one(RegisterWorkflow(chain()))
    start = StartRun("ops", "release", "same", "{}")
    a, b = world.processor.process([start, start], T0)
    assert a.instance_id == b.instance_id and (a.created, b.created) == (True, False)
    assert world.one(start) == RunStarted(a.instance_id, created=False)
    assert isinstance(world.one(StartRun("ops", "nope", "x", "{}")), NotFoundError)


def test_tasks_run_in_dependency_order_with_their_inputs_and_the_run_completes() -> None:
    world = World()
    spot = world.spot()
    run = world.run(input={"region": "eu"})
    (first,) = world.claim(spot, 5)  # only reserve is ready
    payload = json.loads(first.payload)
    assert payload["kind"] == "workflow" and payload["taskId"] == "reserve"
    assert payload["payload"]["region"] == "eu" and payload["input"]["input"] == {"region": "eu"}
    assert world.complete(first, spot, {"id": 42}) == TaskReported()
    (second,) = world.claim(spot, 5)
    payload = json.loads(second.payload)
    assert payload["taskId"] == "provision"
    assert payload["input"]["tasks"] == {"reserve": {"id": 42}}
    assert payload["payload"]["got"] == 42
    world.complete(second, spot)
    (third,) = world.claim(spot)
    world.complete(third, spot)
    stored = world.stored(run)
    assert stored.state == "COMPLETED"
    assert [t.status for t in stored.tasks.values()] == ["DONE", "DONE", "DONE"]
    assert run not in world.processor.state(OpenRuns).runs  # final: out of memory


def test_a_stale_fence_a_wrong_holder_or_a_cancelled_run_is_refused() -> None:
    world = World()
    spot, other = world.spot(), world.spot()
    run = world.run()
    (task,) = world.claim(spot)
    stale = CompleteWorkflowTask(task.task_id, spot, task.fence + 1, "{}")
    assert str(world.one(stale)) == "stale fencing token"
    assert str(world.one(CompleteWorkflowTask(task.task_id, other, task.fence, "{}"))) == (
        "task not leased to this spot"
    )
    assert world.one(CancelRun(run)) == Ok()
    refused = world.one(RenewLease(task.task_id, spot, task.fence))
    assert isinstance(refused, ConflictError) and "CANCELLED" in str(refused)
    assert isinstance(world.complete(task, spot), ConflictError)
    assert world.stored(run).tasks["reserve"].status == "CANCELLED"


def test_a_failed_attempt_is_retried_after_its_backoff_then_fails_for_good_and_compensates() -> (
    None
):
    world = World()
    spot = world.spot()
    run = world.run()
    (reserve,) = world.claim(spot)
    world.complete(reserve, spot)
    (provision,) = world.claim(spot)
    failed = world.one(FailWorkflowTask(provision.task_id, spot, provision.fence, "boom", True))
    assert failed == TaskReported(will_retry=True)
    assert world.claim(spot, now=at(0.4)) == []  # backoff: 1 s, half of it fixed (jitter 0)
    (again,) = world.claim(spot, now=at(0.6))
    assert again.task_id == provision.task_id and again.fence == provision.fence + 1
    assert world.one(FailWorkflowTask(again.task_id, spot, again.fence, "boom", True), at(1)) == (
        TaskReported(will_retry=False)
    )
    # provision failed for good: reserve's compensation runs, as a leased task.
    assert world.stored(run).state == "COMPENSATING"
    (undo,) = world.claim(spot, now=at(2))
    assert undo.task_id.endswith("reserve~compensate")
    assert json.loads(undo.payload)["payload"] == {"undo": "reserve"}
    world.complete(undo, spot, now=at(2))
    assert world.stored(run).state == "COMPENSATED"


def test_compensation_runs_in_reverse_completion_order() -> None:
    world = World()
    spot = world.spot()
    run = world.run()
    for _ in range(3):
        (task,) = world.claim(spot)
        world.complete(task, spot)
    assert world.stored(run).state == "COMPLETED"
    assert world.one(CompensateRun(run, "deploy")) == Ok()  # a completed run is undone too
    undone = []
    while claimed := world.claim(spot):
        undone.append(claimed[0].task_id.rsplit("-", 1)[-1])
        world.complete(claimed[0], spot)
    assert undone == ["deploy~compensate", "provision~compensate", "reserve~compensate"]
    assert isinstance(world.one(CompensateRun(run, "deploy")), ConflictError)  # COMPENSATED
    run2 = world.run(run_id="r2")
    for _ in range(2):
        (task,) = world.claim(spot)
        world.complete(task, spot)
    assert world.one(CompensateRun(run2, "provision")) == Ok()
    order = []
    while claimed := world.claim(spot):
        order.append(claimed[0].task_id.rsplit("-", 1)[-1])
        world.complete(claimed[0], spot)
    assert order == ["provision~compensate", "reserve~compensate"]
    assert world.stored(run2).state == "COMPENSATED"


def test_pause_stops_dispatch_and_resume_restarts_it() -> None:
    world = World()
    spot = world.spot()
    run = world.run()
    assert world.one(PauseRun(run)) == Ok()
    assert world.claim(spot) == []
    assert isinstance(world.one(PauseRun(run)), ConflictError)
    assert world.one(ResumeRun(run)) == Ok()
    assert len(world.claim(spot)) == 1


def test_an_expired_lease_and_a_timeout_fail_the_attempt_once_even_after_a_restart() -> None:
    world = World()
    spot = world.spot()
    run = world.run(chain(timeout=5))
    (task,) = world.claim(spot)
    assert isinstance(world.one(RenewLease(task.task_id, spot, task.fence), at(3)), LeaseExtended)
    assert world.one(FireTimers(), at(4)) == Reaped(tasks=[])
    world.restart()  # the timer is in the store, not in memory
    assert world.one(FireTimers(), at(5)) == Reaped(tasks=[task.task_id])  # the timeout
    assert world.one(FireTimers(), at(6)) == Reaped(tasks=[])  # never twice
    assert world.stored(run).tasks["reserve"].error == "timeout"
    untimed = world.run(chain(version="2"), run_id="untimed")
    claimed = world.claim(spot, 5, now=at(6))
    mine = [t for t in claimed if str(untimed.hex) in t.task_id]
    assert mine[0].task_id not in world.one(FireTimers(), at(6 + 29)).tasks
    fired = world.one(FireTimers(), at(6 + 30))  # the lease: 30 s, not renewed
    assert mine[0].task_id in fired.tasks
    assert world.stored(untimed).tasks["reserve"].error == "lease expired"


def test_a_spot_that_goes_down_gives_back_its_workflow_tasks() -> None:
    world = World()
    spot = world.spot()
    run = world.run()
    world.claim(spot)
    reaped = world.one(ReapSpots(10.0), at(11))
    assert reaped.spots == [spot] and len(reaped.tasks) == 1
    assert world.stored(run).tasks["reserve"].status == "READY"


def test_a_failed_task_is_retried_with_new_input() -> None:
    world = World()
    spot = world.spot()
    run = world.run(chain(compensate=False, retry={"maxAttempts": 1}))
    (task,) = world.claim(spot)
    world.one(FailWorkflowTask(task.task_id, spot, task.fence, "bad input", True))
    assert world.stored(run).state == "FAILED"
    assert world.one(RetryWorkflowTask(run, "reserve", json.dumps({"region": "us"}))) == Ok()
    (again,) = world.claim(spot)
    assert json.loads(again.payload)["payload"]["region"] == "us"
    assert world.stored(run).state == "RUNNING"


def test_open_runs_are_recovered_from_the_index_of_open_work() -> None:
    world = World()
    spot = world.spot()
    done = world.run(run_id="done")
    for _ in range(3):
        (task,) = world.claim(spot)
        world.complete(task, spot)
    running = world.run(run_id="running")
    processor = world.restart()
    assert list(processor.state(OpenRuns).runs) == [running]
    assert done not in processor.state(OpenRuns).runs


def test_the_next_step_goes_out_in_the_batch_that_completed_the_last() -> None:
    world = World()
    spot, waiting = world.spot(), world.spot()
    run = world.run()
    (first,) = world.claim(spot)
    done, claimed = world.processor.process(
        [
            CompleteWorkflowTask(first.task_id, spot, first.fence, "{}"),
            ClaimTasks(waiting, 1),
        ],
        T0,
    )
    assert done == TaskReported()
    assert isinstance(claimed, Claimed) and claimed.tasks[0].task_id.endswith("-provision")
    runs = world.processor.state(OpenRuns)
    assert run in runs.running and run not in runs.ready_next  # provision RUNNING, deploy PENDING


def test_a_long_run_is_snapshotted_and_loads_from_its_snapshot() -> None:
    world = World()
    tasks = [{"id": f"t{i}"} for i in range(60)]
    wide = Definition.from_dict({"namespace": "n", "name": "wide", "version": "1", "tasks": tasks})
    run = world.run(wide)
    spot = world.spot()
    for n in range(59):  # all but one claimed and completed: more than 100 events
        (task,) = world.claim(spot)
        world.complete(task, spot, {"n": n})
    assert world.store.snapshots is not None
    (taken,) = world.store.snapshots.get(run, desc=True, limit=1)
    assert taken.originator_version >= 100
    world.restart()  # the open run is loaded from its snapshot and the events after it
    (last,) = world.claim(spot)
    assert world.complete(last, spot) == TaskReported()
    stored = world.stored(run)
    assert stored.state == "COMPLETED"
    assert json.loads(stored.tasks["t0"].output or "") == {"n": 0}


def test_a_run_under_way_has_its_next_step_claimed_before_runs_not_yet_begun() -> None:
    world = World()
    spot = world.spot()
    first = world.run(run_id="first")
    second = world.run(run_id="second")  # ready before first's next step
    (reserve,) = world.claim(spot)
    assert reserve.task_id == workflow_task_id(first, "reserve")
    assert world.complete(reserve, spot) == TaskReported()
    world.run(run_id="third")
    (nxt,) = world.claim(spot)
    assert nxt.task_id == workflow_task_id(first, "provision")
    (then,) = world.claim(spot)
    assert then.task_id == workflow_task_id(second, "reserve")
    assert world.processor.state(OpenRuns).claimable_count(T0.timestamp(), 10) == 1  # third's


def test_a_run_started_in_the_batch_does_not_go_before_a_run_under_way() -> None:
    world = World()
    spot = world.spot()
    first = world.run(run_id="first")
    (reserve,) = world.claim(spot)
    assert world.complete(reserve, spot) == TaskReported()  # provision READY, held
    started, claimed = world.processor.process(
        [StartRun("ops", "release", "new", '{"region": "eu"}'), ClaimTasks(spot, 1)], T0
    )
    assert isinstance(started, RunStarted) and started.created
    assert isinstance(claimed, Claimed)
    assert [t.task_id for t in claimed.tasks] == [workflow_task_id(first, "provision")]
