"""Sagas, targets and meshes against the real processor, with the store in memory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from domain.agents import Agent, EvolveAgentCapabilities
from domain.family import ConflictError
from domain.ids import agent_id, target_uuid
from domain.meshes import LeaveMesh, Mesh
from domain.processor import CommandProcessor
from domain.sagas import (
    FinishCompensation,
    FinishStep,
    FireSagaTimers,
    Saga,
    StartMeshFormation,
    StartSpawn,
    StepTaken,
    TakeCompensation,
    TakeStep,
)
from domain.sagas.definitions import MESH_STEPS
from domain.targets import Limits, Target, UpdateTarget
from eventstore.store import StorePort, TadpoleStore, memory_env

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class World:
    def __init__(self) -> None:
        self.store = TadpoleStore(memory_env())
        self.p = CommandProcessor(StorePort(self.store))

    def one(self, command: Any, t: float = 0) -> Any:
        (result,) = self.p.process([command], at(t))
        return result

    def ok(self, command: Any, t: float = 0) -> Any:
        result = self.one(command, t)
        assert not isinstance(result, Exception), result
        return result

    def saga(self, uuid: UUID) -> Saga:
        found = self.store.load(uuid)
        assert isinstance(found, Saga)
        return found

    def target(self, name: str = "t1") -> Target:
        found = self.store.load(target_uuid(name))
        assert isinstance(found, Target)
        return found

    def spawn(
        self, target: str = "t1", mesh: UUID | None = None, cpu: int = 300, **caps: str
    ) -> UUID:
        saga = uuid4()
        self.ok(StartSpawn(saga, uuid4(), target, mesh, dict(caps), cpu, 1000))
        return saga

    def step(self, saga: UUID, t: float = 0, ok: bool = True, driver: str = "r1") -> Any:
        taken = self.ok(TakeStep(saga, driver), t)
        return self.one(FinishStep(saga, taken.step, driver, taken.fence, ok, None, "no", True), t)

    def compensate_all(self, saga: UUID, t: float = 0) -> None:
        while self.saga(saga).state == "COMPENSATING":
            taken = self.ok(TakeCompensation(saga, "r1"), t)
            self.ok(
                FinishCompensation(saga, taken.step, "r1", taken.fence, True, None, "", True), t
            )

    def mesh(self, required: dict[str, str], low: int = 1, high: int = 3) -> UUID:
        saga, mesh = uuid4(), uuid4()
        self.ok(StartMeshFormation(saga, mesh, "full", required, low, high))
        after = None
        for n, spec in enumerate(MESH_STEPS):
            taken = self.ok(
                TakeStep(saga, "p", spec.name, after, spec.timeout_seconds, spec.compensation)
            )
            self.ok(FinishStep(saga, spec.name, "p", taken.fence, True, None, "", True, n == 2))
            after = spec.name
        assert self.saga(saga).state == "COMPLETED"
        return mesh


@pytest.fixture
def w() -> World:
    world = World()
    world.ok(UpdateTarget("t1", "READY", {}, Limits(1000, 10_000, 3)))
    return world


def test_concurrent_spawns_in_one_batch_never_exceed_the_targets_limits(w: World) -> None:
    w.ok(UpdateTarget("t1", "READY", {}, Limits(1000, 10_000, 10)))
    sagas = [w.spawn() for _ in range(5)]  # 5 × 300 millicores of 1000
    takes = w.p.process([TakeStep(s, "r1") for s in sagas], at(1))
    finishes = [
        FinishStep(s, t.step, "r1", t.fence, True, None, "", True)
        for s, t in zip(sagas, takes, strict=True)
    ]
    w.p.process(finishes, at(1))  # all five reservations decided in one batch
    states = [w.saga(s).state for s in sagas]
    assert states.count("RUNNING") == 3 and states.count("COMPENSATED") == 2
    refused = [
        w.saga(s).steps["reserve_resources"]["error"] for s in sagas if w.saga(s).state != "RUNNING"
    ]
    assert all("cpu_millicores left" in e for e in refused), refused
    target = w.target()
    assert target.used_cpu == 900 and target.workloads == 3


def test_max_workloads_is_a_limit_too(w: World) -> None:
    sagas = [w.spawn(cpu=1) for _ in range(4)]
    for s in sagas:
        w.step(s)
    assert [w.saga(s).state for s in sagas].count("COMPENSATED") == 1
    assert "max_workloads" in (w.saga(sagas[-1]).steps["reserve_resources"]["error"] or "")


def test_one_driver_at_a_time_and_only_with_its_fence(w: World) -> None:
    saga = w.spawn()
    taken = w.ok(TakeStep(saga, "r1"))
    assert isinstance(taken, StepTaken) and taken.fence == 1
    assert isinstance(w.one(TakeStep(saga, "r2")), ConflictError)  # r1 drives it
    stale = FinishStep(saga, taken.step, "r1", taken.fence + 1, True, None, "", True)
    assert "stale fencing token" in str(w.one(stale))
    other = FinishStep(saga, taken.step, "r2", taken.fence, True, None, "", True)
    assert "driven by r1" in str(w.one(other))
    assert w.target().workloads == 0  # neither took effect


def test_a_step_past_its_deadline_times_out_and_its_late_report_takes_no_effect(w: World) -> None:
    saga = w.spawn()
    taken = w.ok(TakeStep(saga, "r1"), 0)
    w.ok(FireSagaTimers(), 4.9)
    assert w.saga(saga).state == "RUNNING"  # reserve_resources has 5 s
    w.ok(FireSagaTimers(), 5.0)
    s = w.saga(saga)
    assert s.state == "COMPENSATING" and s.steps["reserve_resources"]["state"] == "TIMED_OUT"
    assert s.to_compensate == ["reserve_resources"]  # the timed-out step is undone too
    late = w.one(FinishStep(saga, taken.step, "r1", taken.fence, True, None, "", True), 6)
    assert isinstance(late, ConflictError)
    assert w.target().workloads == 0  # the late reservation was never made
    w.compensate_all(saga, 6)
    assert w.saga(saga).state == "COMPENSATED"


def test_the_saga_timeout_compensates_a_saga_nobody_drives(w: World) -> None:
    saga = w.spawn()
    w.step(saga)
    w.ok(FireSagaTimers(), 299)
    assert w.saga(saga).state == "RUNNING"
    w.ok(FireSagaTimers(), 300)
    assert w.saga(saga).state == "COMPENSATING"
    assert "did not finish" in (w.saga(saga).reason or "")


def test_a_compensation_failing_for_good_aborts_the_saga(w: World) -> None:
    saga = w.spawn()
    w.step(saga)
    w.step(saga, ok=False)
    t = 1.0
    for attempt in range(5):
        taken = w.one(TakeCompensation(saga, "r1"), t)
        assert isinstance(taken, StepTaken), (attempt, taken)
        early = w.one(TakeCompensation(saga, "r1"), t)
        assert isinstance(early, ConflictError)  # it is held, then pauses before a retry
        w.ok(FinishCompensation(saga, taken.step, "r1", taken.fence, False, None, "down", True), t)
        t += 20
    s = w.saga(saga)
    assert s.state == "ABORTED" and "failed 5 times" in (s.reason or "")
    assert w.target().workloads == 1  # aborted: left for a human, as the saga says


def test_a_lapsed_compensation_lease_counts_as_a_failed_attempt(w: World) -> None:
    saga = w.spawn()
    w.step(saga)
    w.step(saga, ok=False)
    w.ok(TakeCompensation(saga, "gone"), 1)
    w.ok(FireSagaTimers(), 7)
    s = w.saga(saga)
    assert s.steps["reserve_resources"]["attempts"] == 1 and s.state == "COMPENSATING"
    w.compensate_all(saga, 20)
    assert w.saga(saga).state == "COMPENSATED" and w.target().workloads == 0


def test_mesh_constraints_are_refused_with_the_rule(w: World) -> None:
    mesh = w.mesh({"gpu": "a100"}, low=1, high=1)
    lacking = w.spawn(mesh=mesh, gpu="t4")
    for _ in range(3):
        w.step(lacking)
    s = w.saga(lacking)
    assert s.steps["register_with_mesh"]["error"] == (
        "agent lacks the mesh's required capabilities: gpu=a100"
    )
    w.compensate_all(lacking)
    member = w.spawn(mesh=mesh, gpu="a100")
    for _ in range(3):
        w.step(member)
    assert w.saga(member).state == "COMPLETED"
    full = w.spawn(mesh=mesh, gpu="a100")
    for _ in range(3):
        w.step(full)
    assert "mesh is full" in (w.saga(full).steps["register_with_mesh"]["error"] or "")
    agent = UUID(hex=w.saga(member).params["agentId"].removeprefix("agent-"))
    left = w.one(LeaveMesh(mesh, agent))
    assert isinstance(left, ConflictError) and "min_members 1" in str(left)
    evolved = w.one(EvolveAgentCapabilities(agent, {"gpu": "t4"}))
    assert isinstance(evolved, ConflictError) and "gpu=a100" in str(evolved)
    found = w.store.load(mesh)
    assert isinstance(found, Mesh) and found.members == [agent_id(agent)]


def test_an_agent_is_in_at_most_one_mesh(w: World) -> None:
    first, second = w.mesh({}), w.mesh({})
    saga = w.spawn(mesh=first)
    for _ in range(3):
        w.step(saga)
    agent = w.store.load(UUID(hex=w.saga(saga).params["agentId"].removeprefix("agent-")))
    assert isinstance(agent, Agent)
    with pytest.raises(Exception, match="at most one mesh"):
        agent.check_join(f"mesh-{second.hex}")


def test_a_participant_only_takes_its_step_after_the_one_it_follows(w: World) -> None:
    saga, mesh = uuid4(), uuid4()
    w.ok(StartMeshFormation(saga, mesh, "ring", {}, 0, 4))
    second = MESH_STEPS[1]
    early = w.one(TakeStep(saga, "p", second.name, MESH_STEPS[0].name, 5.0, second.compensation))
    assert isinstance(early, ConflictError) and "has not succeeded" in str(early)
    first = MESH_STEPS[0]
    w.ok(TakeStep(saga, "p", first.name, None, 10.0, first.compensation))
    again = w.one(TakeStep(saga, "q", first.name, None, 10.0, first.compensation))
    assert isinstance(again, ConflictError)


def test_a_restarted_writer_still_fires_an_open_sagas_timer(w: World) -> None:
    saga = w.spawn()
    w.ok(TakeStep(saga, "r1"), 0)
    restarted = CommandProcessor(StorePort(w.store))  # recovers from the index of open work
    (fired,) = restarted.process([FireSagaTimers()], at(6))
    assert fired.sagas == [f"saga-{saga.hex}"]
    assert w.saga(saga).state == "COMPENSATING"


def test_a_target_with_hundreds_of_events_loads_from_its_snapshot(w: World) -> None:
    for n in range(60):  # 120 events: a snapshot is taken at 100
        saga = w.spawn(cpu=1)
        w.step(saga, t=n)
        w.ok(UpdateTarget("t1", "READY", {"n": str(n)}, Limits(1000, 10_000, 3)), n)
    restarted = CommandProcessor(StorePort(w.store))
    target = restarted.load(target_uuid("t1"), Target)
    assert target is not None and target.version == w.target().version
    assert target.capabilities == {"n": "59"} and target.workloads == w.target().workloads


def test_a_step_still_running_at_the_sagas_deadline_is_timed_out_with_it(w: World) -> None:
    saga, mesh = uuid4(), uuid4()
    w.ok(StartMeshFormation(saga, mesh, "ring", {}, 0, 4))
    first = MESH_STEPS[0]
    taken = w.ok(TakeStep(saga, "p", first.name, None, 300.0, first.compensation), 10)
    w.ok(FireSagaTimers(), 300)  # the saga's 300 s are up; the step had until 310
    s = w.saga(saga)
    assert s.state == "COMPENSATING" and s.steps[first.name]["state"] == "TIMED_OUT"
    assert s.to_compensate == [first.name]
    late = FinishStep(saga, first.name, "p", taken.fence, True, None, "", True, True)
    assert isinstance(w.one(late, 301), ConflictError)  # it can no longer complete the saga
    w.compensate_all(saga, 301)
    assert w.saga(saga).state == "COMPENSATED"


def test_each_compensation_attempt_gets_the_steps_own_timeout(w: World) -> None:
    saga = w.spawn()
    w.step(saga)  # reserve_resources: 5 s
    w.step(saga, ok=False)
    deadlines = []
    t = 10.0
    for _ in range(3):
        taken = w.ok(TakeCompensation(saga, "gone"), t)
        deadlines.append((taken.deadline - at(t)).total_seconds())
        w.ok(FireSagaTimers(), t + 6)  # the lease lapses
        t += 30
    assert deadlines == [5.0, 5.0, 5.0]


def test_a_report_may_take_what_the_saga_needs_next_in_its_batch(w: World) -> None:
    saga = w.spawn()
    taken = w.ok(TakeStep(saga, "r1"))
    done = w.ok(FinishStep(saga, taken.step, "r1", taken.fence, True, None, "", True, False, True))
    assert done.next is not None and done.next.step == "initialize_agent_state"
    assert done.next.fence == taken.fence + 1
    following = done.next
    failed = w.ok(
        FinishStep(
            saga, following.step, "r1", following.fence, False, None, "no", True, False, True
        )
    )
    assert failed.saga_state == "COMPENSATING"
    # the failed step did nothing: reserve_resources is the one to undo
    assert failed.next is not None and failed.next.compensation == "release_resources"
    undo = failed.next
    end = w.ok(FinishCompensation(saga, undo.step, "r1", undo.fence, True, None, "", True, True))
    assert end.saga_state == "COMPENSATED" and end.next is None
    assert w.target().workloads == 0
