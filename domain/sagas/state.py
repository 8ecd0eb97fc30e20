"""The sagas family's state (open sagas in memory, for their timers) and its handlers."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from domain import system
from domain.family import Config, ConflictError, Loader, NotFoundError, Phase, Recent, Result
from domain.ids import agent_id, mesh_id
from domain.processor import UnitOfWork
from domain.sagas.commands import (
    FinishCompensation,
    FinishStep,
    FireSagaTimers,
    SagaStarted,
    StartMeshFormation,
    StartSpawn,
    StepFinished,
    StepTaken,
    TakeCompensation,
    TakeStep,
    TimersFired,
)
from domain.sagas.definitions import StepSpec
from domain.sagas.effects import EFFECTS, EffectRefused
from domain.sagas.saga import AgentSpawning, MeshFormation, Saga, SagaError


class OpenSagas:
    """Sagas not yet final, in memory (the timer loop looks at them all); the rest on demand."""

    def __init__(self, config: Config):
        self.open: dict[UUID, Saga] = {}
        self.recent: Recent[UUID, Saga] = Recent(config.recent)

    def recover(self, load: Loader, open_ids: Iterable[UUID], now: datetime) -> None:
        self.open.clear()
        self.recent.clear()
        for uuid in open_ids:
            saga = load(uuid, Saga)
            if saga is not None:
                self.keep(saga)

    def held(self, uuid: UUID) -> Saga | None:
        return self.open.get(uuid) or self.recent.get(uuid)

    def keep(self, aggregate: Any) -> None:
        if not isinstance(aggregate, Saga):
            return
        if aggregate.is_final:
            self.open.pop(aggregate.id, None)
            self.recent.put(aggregate.id, aggregate)
        else:
            self.open[aggregate.id] = aggregate

    def begin(self, uow: UnitOfWork) -> SagasWork:
        return SagasWork(self, uow)


class SagasWork:
    """The sagas' part of one batch."""

    def __init__(self, state: OpenSagas, uow: UnitOfWork):
        self.state = state
        self.uow = uow
        self.aborted: set[UUID] = set()

    def end_phase(self, phase: Phase) -> None:
        pass

    def _add(self, saga: Saga) -> None:
        """Store the saga's changes with the batch; a saga that was just ABORTED also
        records seed 001's ``emergency_state_activated`` (a human must look)."""
        self.uow.add(saga)
        aborted_now = any(type(e).__name__ == "Aborted" for e in saga.pending_events)
        if aborted_now and saga.id not in self.aborted:
            self.aborted.add(saga.id)
            system.record(
                self.uow,
                "emergency_state_activated",
                f"saga {saga.public_id} aborted: {saga.reason}",
                {"sagaId": saga.public_id, "kind": saga.kind},
            )

    def commit(self) -> None:
        pass

    # ---- starting ------------------------------------------------------------------------

    def spawn(self, c: StartSpawn) -> Result:
        existing = self.uow.get(c.saga, Saga)
        if existing is not None:
            return self._started(existing, created=False)
        params = {
            "agentId": agent_id(c.agent),
            "targetId": c.target_id,
            "meshId": mesh_id(c.mesh) if c.mesh is not None else None,
            "capabilities": c.capabilities,
            "resources": {"cpu_millicores": c.cpu_millicores, "memory_bytes": c.memory_bytes},
        }
        saga = AgentSpawning.begin(c.saga, params, self.uow.now)
        self.uow.add(saga)
        return self._started(saga, created=True)

    def form_mesh(self, c: StartMeshFormation) -> Result:
        existing = self.uow.get(c.saga, Saga)
        if existing is not None:
            return self._started(existing, created=False)
        params = {
            "meshId": mesh_id(c.mesh),
            "topology": c.topology,
            "requiredCapabilities": c.required_capabilities,
            "minMembers": c.min_members,
            "maxMembers": c.max_members,
        }
        saga = MeshFormation.begin(c.saga, params, self.uow.now)
        self.uow.add(saga)
        return self._started(saga, created=True)

    @staticmethod
    def _started(saga: Saga, created: bool) -> SagaStarted:
        return SagaStarted(
            saga.public_id,
            saga.kind,
            created,
            agent_id=saga.params.get("agentId"),
            mesh_id=saga.params.get("meshId"),
        )

    # ---- steps ------------------------------------------------------------------------------

    def _saga(self, uuid: UUID) -> Saga | NotFoundError:
        saga = self.uow.get(uuid, Saga)
        return saga if saga is not None else NotFoundError("saga not found")

    def take(self, c: TakeStep) -> Result:
        saga = self._saga(c.saga)
        if isinstance(saga, NotFoundError):
            return saga
        try:
            if isinstance(saga, AgentSpawning):
                spec = saga.next_spec()
                if spec is None or (c.step is not None and c.step != spec.name):
                    running = saga.running_step()
                    raise SagaError(
                        f"step {running['name']} is running, driven by {running['driver']}"
                        if running
                        else f"saga is {saga.state}: no step to take"
                        if spec is None
                        else f"the next step is {spec.name}"
                    )
            else:
                assert isinstance(saga, MeshFormation)
                if c.step is None or c.timeout_seconds is None or c.compensation is None:
                    raise SagaError(
                        "a participant names its step, its timeout and its compensation"
                    )
                saga.may_follow(c.after)
                spec = StepSpec(c.step, c.compensation, c.timeout_seconds)
            fence = saga.take(spec, c.driver, self.uow.now)
        except SagaError as error:
            return ConflictError(str(error))
        self.uow.add(saga)
        return self._taken(saga, spec.name, fence)

    def finish(self, c: FinishStep) -> Result:
        saga = self._saga(c.saga)
        if isinstance(saga, NotFoundError):
            return saga
        try:
            final = saga.is_last(c.step) if isinstance(saga, AgentSpawning) else c.final
            if c.ok:
                outcome = c.outcome
                saga._check_report(c.step, c.driver, c.fence, ("RUNNING",))
                if c.apply:
                    try:
                        outcome = self._effect(c.step, saga)
                    except EffectRefused as refused:
                        saga.fail(c.step, c.driver, c.fence, str(refused), self.uow.now)
                        self.uow.add(saga)
                        return self._finished(saga, c.step, c.driver, c.take_next)
                saga.succeed(c.step, c.driver, c.fence, outcome, final, self.uow.now)
            else:
                saga.fail(c.step, c.driver, c.fence, c.error or "failed", self.uow.now)
        except SagaError as error:
            return ConflictError(str(error))
        self.uow.add(saga)
        return self._finished(saga, c.step, c.driver, c.take_next)

    def _effect(self, name: str, saga: Saga) -> Any:
        effect = EFFECTS.get(name)
        if effect is None:
            raise EffectRefused(f"{name} has no built-in handler: configure a hook for it")
        return effect(self.uow, saga)

    def _finished(self, saga: Saga, step: str, driver: str, take_next: bool) -> StepFinished:
        s = saga.steps[step]
        return StepFinished(
            saga.public_id,
            step,
            s["state"],
            saga.state,
            s["error"],
            next=self._next(saga, driver) if take_next else None,
        )

    def _next(self, saga: Saga, driver: str) -> StepTaken | None:
        """What ``driver`` takes next of ``saga`` in this batch (the claimNext of sagas):
        the next step of an orchestrated one, or the next compensation."""
        try:
            if saga.state == "RUNNING" and isinstance(saga, AgentSpawning):
                spec = saga.next_spec()
                if spec is None:
                    return None
                fence = saga.take(spec, driver, self.uow.now)
                return self._taken(saga, spec.name, fence)
            if saga.next_compensation() is not None:
                step, fence = saga.take_compensation(None, driver, self.uow.now)
                return self._taken(saga, step, fence, compensation=True)
        except SagaError:
            return None
        return None

    @staticmethod
    def _taken(saga: Saga, step: str, fence: int, compensation: bool = False) -> StepTaken:
        s = saga.steps[step]
        return StepTaken(
            saga.public_id,
            saga.kind,
            step,
            s["compensation"],
            fence,
            _at(s["deadline"]),
            saga.params,
            outcome=s["outcome"] if compensation else None,
        )

    def take_compensation(self, c: TakeCompensation) -> Result:
        saga = self._saga(c.saga)
        if isinstance(saga, NotFoundError):
            return saga
        try:
            step, fence = saga.take_compensation(c.step, c.driver, self.uow.now)
        except SagaError as error:
            return ConflictError(str(error))
        self.uow.add(saga)
        return self._taken(saga, step, fence, compensation=True)

    def finish_compensation(self, c: FinishCompensation) -> Result:
        saga = self._saga(c.saga)
        if isinstance(saga, NotFoundError):
            return saga
        try:
            saga._check_report(c.step, c.driver, c.fence, ("COMPENSATING",))
            outcome, error = c.outcome, (None if c.ok else c.error or "failed")
            if c.ok and c.apply:
                try:
                    outcome = self._effect(saga.steps[c.step]["compensation"], saga)
                except EffectRefused as refused:
                    error = str(refused)
            if error is None:
                saga.compensated(c.step, c.driver, c.fence, outcome, self.uow.now)
            else:
                saga.compensation_failed(c.step, c.driver, c.fence, error, self.uow.now)
        except SagaError as problem:
            return ConflictError(str(problem))
        self._add(saga)
        return self._finished(saga, c.step, c.driver, c.take_next)

    def fire_timers(self, c: FireSagaTimers) -> Result:
        fired: list[str] = []
        for saga in list(self.state.open.values()):
            due = saga.next_timer()
            if due is not None and due <= self.uow.ts and saga.fire(self.uow.now):
                self._add(saga)
                fired.append(saga.public_id)
        return TimersFired(fired)


def _at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


# ---- what each command may load from the store (Family.reads) ---------------------------


def saga_reads(
    c: StartSpawn
    | StartMeshFormation
    | TakeStep
    | FinishStep
    | TakeCompensation
    | FinishCompensation,
) -> tuple[UUID]:
    return (c.saga,)
