"""A saga's own state, event-sourced: its steps, who drives each, and its compensation.

One aggregate per saga. Its steps are taken one at a time by a saga runner (or a
participant) under a lease: taking a step gives it a fence one higher than the
saga's last and a deadline (the step's timeout); only the taker with that fence
may finish it. So each saga is driven by exactly one runner at a time, and a
runner that died holds nothing past its step's deadline.

* A step that fails, or passes its deadline (``StepTimedOut``, fired by the
  writer's timer loop like a workflow task's lease), starts compensation: the
  steps that succeeded — and the one that timed out, whose effect may have
  happened — are compensated one by one in reverse order, each taken under a
  lease too. Every compensation is idempotent, so compensating a step whose
  effect never happened is harmless.
* A compensation that fails (or whose taker's lease lapses) is tried again,
  after a growing pause; after ``MAX_COMPENSATION_ATTEMPTS`` the saga is
  ABORTED: it needs a human.
* A saga that has not finished within ``SAGA_TIMEOUT_SECONDS`` is compensated
  (the step between two others that nobody took, say).

The saga ends COMPLETED, COMPENSATED or ABORTED. Events are triggered through
``type(self)``'s event classes, so each kind of saga (a subclass) has its own
event types, and the relay routes each to its topic.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.ids import saga_id
from domain.sagas.definitions import (
    AGENT_SPAWNING,
    MAX_COMPENSATION_ATTEMPTS,
    MAX_STEP_TIMEOUT_SECONDS,
    MESH_FORMATION,
    SAGA_TIMEOUT_SECONDS,
    SPAWN_STEPS,
    StepSpec,
)

# Saga states.
RUNNING, COMPENSATING = "RUNNING", "COMPENSATING"
COMPLETED, COMPENSATED, ABORTED = "COMPLETED", "COMPENSATED", "ABORTED"
SAGA_STATES = (RUNNING, COMPENSATING, COMPLETED, COMPENSATED, ABORTED)
SAGA_FINAL = frozenset({COMPLETED, COMPENSATED, ABORTED})
# Step states (RUNNING is shared with the saga's).
SUCCEEDED, FAILED, TIMED_OUT = "SUCCEEDED", "FAILED", "TIMED_OUT"
STEP_COMPENSATING, STEP_COMPENSATED = "COMPENSATING", "COMPENSATED"


class SagaError(RuntimeError):
    """A take or a report the saga refuses (409); the message says why."""


def _ts(at: datetime) -> float:
    return at.timestamp()


def _iso(ts: float | None) -> str | None:
    from datetime import UTC

    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


class Saga(Aggregate):
    """What both kinds of saga share (see the module docstring)."""

    kind: ClassVar[str]
    coordination: ClassVar[str]

    class Started(Aggregate.Created):
        params: str  # JSON object: what the saga's steps act on
        deadline: datetime
        at: datetime

    @classmethod
    def begin(cls, uuid: UUID, params: dict[str, Any], at: datetime) -> Saga:
        return cls._create(
            cls.Started,
            id=uuid,
            params=json.dumps(params, separators=(",", ":"), sort_keys=True),
            deadline=at + timedelta(seconds=SAGA_TIMEOUT_SECONDS),
            at=at,
        )

    def __init__(self, params: str, deadline: datetime, at: datetime):
        # Not an @event method: the library calls it from each subclass's own Started.
        self.params: dict[str, Any] = json.loads(params)
        self.state = RUNNING
        self.deadline = _ts(deadline)
        self.started_at = _ts(at)
        self.ended_at: float | None = None
        #: Step name → its record (plain values: snapshots store them as they are).
        self.steps: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []
        self.fence = 0
        self.reason: str | None = None
        #: Steps still to compensate, the next first.
        self.to_compensate: list[str] = []

    # ---- reading ------------------------------------------------------------------------

    @property
    def public_id(self) -> str:
        return saga_id(self.id)

    @property
    def is_final(self) -> bool:
        return self.state in SAGA_FINAL

    def running_step(self) -> dict[str, Any] | None:
        if self.order:
            last = self.steps[self.order[-1]]
            if last["state"] == RUNNING:
                return last
        return None

    def last_succeeded(self) -> str | None:
        if self.order and self.steps[self.order[-1]]["state"] == SUCCEEDED:
            return self.order[-1]
        return None

    def view(self) -> dict[str, Any]:
        """The saga as the API shows it."""
        return {
            "kind": self.kind,
            "coordination": self.coordination,
            "state": self.state,
            "reason": self.reason,
            "startedAt": _iso(self.started_at),
            "endedAt": _iso(self.ended_at),
            "steps": [self._step_view(self.steps[name]) for name in self.order],
            "params": self.params,
        }

    @staticmethod
    def _step_view(s: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": s["name"],
            "state": s["state"],
            "startedAt": _iso(s["started"]),
            "endedAt": _iso(s["ended"]),
            "outcome": s["outcome"] if s["error"] is None else s["error"],
            "compensation": s["compensation"],
            "compensatedAt": _iso(s["compensated"]),
            "driver": s["driver"],
        }

    # ---- taking and finishing steps -----------------------------------------------------

    def _check_report(self, step: str, driver: str, fence: int, states: tuple[str, ...]) -> None:
        if RUNNING in states and self.state != RUNNING:
            raise SagaError(f"saga is {self.state}: step {step} can no longer be reported")
        s = self.steps.get(step)
        if s is None:
            raise SagaError(f"step {step} was never taken")
        if s["fence"] != fence:
            raise SagaError(f"stale fencing token for step {step}: it is {s['fence']}")
        if s["driver"] != driver:
            raise SagaError(f"step {step} is driven by {s['driver']}")
        if s["state"] not in states:
            raise SagaError(f"step {step} is {s['state']}")

    class StepStarted(Aggregate.Event):
        step: str
        compensation: str
        driver: str
        fence: int
        deadline: datetime
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.fence = self.fence
            saga.order.append(self.step)
            saga.steps[self.step] = {
                "name": self.step,
                "compensation": self.compensation,
                "state": RUNNING,
                "driver": self.driver,
                "fence": self.fence,
                "started": _ts(self.at),
                "deadline": _ts(self.deadline),
                "timeout": _ts(self.deadline) - _ts(self.at),
                "ended": None,
                "outcome": None,
                "error": None,
                "compensated": None,
                "attempts": 0,
                "retry_at": 0.0,
            }

    def take(self, spec: StepSpec, driver: str, at: datetime) -> int:
        """Start step ``spec`` for ``driver``: its fence."""
        if self.state != RUNNING:
            raise SagaError(f"saga is {self.state}")
        running = self.running_step()
        if running is not None:
            raise SagaError(f"step {running['name']} is running, driven by {running['driver']}")
        if spec.name in self.steps:
            raise SagaError(f"step {spec.name} is {self.steps[spec.name]['state']}")
        if not 0 < spec.timeout_seconds <= MAX_STEP_TIMEOUT_SECONDS:
            raise SagaError(f"a step's timeout must be within (0, {MAX_STEP_TIMEOUT_SECONDS:g}] s")
        fence = self.fence + 1
        self.trigger_event(
            type(self).StepStarted,
            step=spec.name,
            compensation=spec.compensation,
            driver=driver,
            fence=fence,
            deadline=at + timedelta(seconds=spec.timeout_seconds),
            at=at,
        )
        return fence

    class StepSucceeded(Aggregate.Event):
        step: str
        fence: int
        outcome: str  # JSON
        at: datetime

        def apply(self, saga: Saga) -> None:
            s = saga.steps[self.step]
            s.update(state=SUCCEEDED, ended=_ts(self.at), outcome=json.loads(self.outcome))

    class Completed(Aggregate.Event):
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.state = COMPLETED
            saga.ended_at = _ts(self.at)

    def succeed(
        self, step: str, driver: str, fence: int, outcome: Any, final: bool, at: datetime
    ) -> None:
        """The step did its work; ``final``: the saga is done."""
        self._check_report(step, driver, fence, (RUNNING,))
        self.trigger_event(
            type(self).StepSucceeded,
            step=step,
            fence=fence,
            outcome=json.dumps(outcome, separators=(",", ":"), sort_keys=True),
            at=at,
        )
        if final:
            self.trigger_event(type(self).Completed, at=at)

    class StepFailed(Aggregate.Event):
        step: str
        fence: int
        error: str
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.steps[self.step].update(state=FAILED, ended=_ts(self.at), error=self.error)

    def fail(self, step: str, driver: str, fence: int, error: str, at: datetime) -> None:
        """The step could not do its work: compensate what was done."""
        self._check_report(step, driver, fence, (RUNNING,))
        self.trigger_event(type(self).StepFailed, step=step, fence=fence, error=error, at=at)
        self._compensate(f"{step} failed: {error}", at)

    class StepTimedOut(Aggregate.Event):
        step: str
        fence: int
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.steps[self.step].update(
                state=TIMED_OUT, ended=_ts(self.at), error="timed out: did not finish in time"
            )

    # ---- compensation ---------------------------------------------------------------------

    class CompensationStarted(Aggregate.Event):
        reason: str
        steps: list[str]
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.state = COMPENSATING
            saga.reason = self.reason
            saga.to_compensate = list(self.steps)

    class Compensated(Aggregate.Event):
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.state = COMPENSATED
            saga.ended_at = _ts(self.at)

    def _compensate(self, reason: str, at: datetime) -> None:
        steps = [
            s for s in reversed(self.order) if self.steps[s]["state"] in (SUCCEEDED, TIMED_OUT)
        ]
        self.trigger_event(type(self).CompensationStarted, reason=reason, steps=steps, at=at)
        if not steps:
            self.trigger_event(type(self).Compensated, at=at)

    class CompensationTaken(Aggregate.Event):
        step: str
        driver: str
        fence: int
        deadline: datetime
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.fence = self.fence
            saga.steps[self.step].update(
                state=STEP_COMPENSATING,
                driver=self.driver,
                fence=self.fence,
                deadline=_ts(self.deadline),
            )

    def next_compensation(self) -> str | None:
        return self.to_compensate[0] if self.state == COMPENSATING and self.to_compensate else None

    def take_compensation(self, step: str | None, driver: str, at: datetime) -> tuple[str, int]:
        """Take the next compensation (``step``: only if it is that step's); its step and fence."""
        head = self.next_compensation()
        if head is None:
            raise SagaError(f"saga is {self.state}: nothing to compensate")
        if step is not None and step != head:
            raise SagaError(f"the next step to compensate is {head}")
        s = self.steps[head]
        if s["state"] == STEP_COMPENSATING:
            raise SagaError(f"the compensation of {head} is driven by {s['driver']}")
        if _ts(at) < s["retry_at"]:
            raise SagaError(f"the compensation of {head} is retried from {_iso(s['retry_at'])}")
        fence = self.fence + 1
        timeout = s["timeout"]  # the step's own, on every attempt
        self.trigger_event(
            type(self).CompensationTaken,
            step=head,
            driver=driver,
            fence=fence,
            deadline=at + timedelta(seconds=max(timeout, 1.0)),
            at=at,
        )
        return head, fence

    class StepCompensated(Aggregate.Event):
        step: str
        fence: int
        outcome: str  # JSON
        remaining: list[str]
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.steps[self.step].update(
                state=STEP_COMPENSATED,
                compensated=_ts(self.at),
                compensation_outcome=json.loads(self.outcome),
            )
            saga.to_compensate = list(self.remaining)

    def compensated(self, step: str, driver: str, fence: int, outcome: Any, at: datetime) -> None:
        self._check_report(step, driver, fence, (STEP_COMPENSATING,))
        self.trigger_event(
            type(self).StepCompensated,
            step=step,
            fence=fence,
            outcome=json.dumps(outcome, separators=(",", ":"), sort_keys=True),
            remaining=[s for s in self.to_compensate if s != step],
            at=at,
        )
        if not self.to_compensate:
            self.trigger_event(type(self).Compensated, at=at)

    class CompensationFailed(Aggregate.Event):
        step: str
        fence: int
        error: str
        retry_at: datetime
        at: datetime

        def apply(self, saga: Saga) -> None:
            s = saga.steps[self.step]
            s.update(
                state=SUCCEEDED if s["error"] is None else TIMED_OUT,
                attempts=s["attempts"] + 1,
                retry_at=_ts(self.retry_at),
                last_error=self.error,
            )

    class Aborted(Aggregate.Event):
        reason: str
        at: datetime

        def apply(self, saga: Saga) -> None:
            saga.state = ABORTED
            saga.reason = self.reason
            saga.ended_at = _ts(self.at)

    def compensation_failed(
        self, step: str, driver: str, fence: int, error: str, at: datetime
    ) -> None:
        self._check_report(step, driver, fence, (STEP_COMPENSATING,))
        self._compensation_failed(step, fence, error, at)

    def _compensation_failed(self, step: str, fence: int, error: str, at: datetime) -> None:
        attempts = self.steps[step]["attempts"] + 1
        pause = min(10.0, 0.5 * 2 ** (attempts - 1))
        self.trigger_event(
            type(self).CompensationFailed,
            step=step,
            fence=fence,
            error=error,
            retry_at=at + timedelta(seconds=pause),
            at=at,
        )
        if attempts >= MAX_COMPENSATION_ATTEMPTS:
            self.trigger_event(
                type(self).Aborted,
                reason=f"the compensation of {step} failed {attempts} times: {error}",
                at=at,
            )

    # ---- timers ---------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When this saga's next timer is due (None when final)."""
        if self.is_final:
            return None
        if self.state == RUNNING:
            running = self.running_step()
            return min(self.deadline, running["deadline"]) if running else self.deadline
        head = self.next_compensation()
        if head is not None and self.steps[head]["state"] == STEP_COMPENSATING:
            return float(self.steps[head]["deadline"])
        return None

    def fire(self, at: datetime) -> bool:
        """Fire what is due at ``at``; whether anything was."""
        ts = _ts(at)
        due = self.next_timer()
        if due is None or ts < due:
            return False
        if self.state == RUNNING:
            running = self.running_step()
            late = f"saga did not finish within {SAGA_TIMEOUT_SECONDS:g} s"
            if running is not None:  # its own deadline, or the saga's: it is over either way
                name = running["name"]
                self.trigger_event(
                    type(self).StepTimedOut, step=name, fence=running["fence"], at=at
                )
                self._compensate(f"{name} timed out" if ts >= running["deadline"] else late, at)
            else:
                self._compensate(late, at)
            return True
        head = self.next_compensation()
        if head is not None:
            s = self.steps[head]
            self._compensation_failed(head, s["fence"], "timed out: did not finish in time", at)
            return True
        return False


class AgentSpawning(Saga):
    """Spawns one agent: reserve resources on its target, initialize it, register it with
    its mesh (orchestrated: this aggregate hands the steps out in order)."""

    kind = AGENT_SPAWNING
    coordination = "orchestration"

    def __init__(self, params: str, deadline: datetime, at: datetime):
        # The library gives each aggregate class an __init__ of its own: this one is Saga's.
        super().__init__(params, deadline, at)

    def next_spec(self) -> StepSpec | None:
        """The step to take next (None when one runs or all were taken)."""
        if self.state != RUNNING or self.running_step() is not None:
            return None
        done = len(self.order)
        return SPAWN_STEPS[done] if done < len(SPAWN_STEPS) else None

    def is_last(self, step: str) -> bool:
        return step == SPAWN_STEPS[-1].name


class MeshFormation(Saga):
    """Forms one mesh: negotiate capabilities, establish connections, synchronize state
    (choreographed: each participant takes its own step when the one it follows has
    succeeded; this aggregate only records, times and compensates)."""

    kind = MESH_FORMATION
    coordination = "choreography"

    def __init__(self, params: str, deadline: datetime, at: datetime):
        # The library gives each aggregate class an __init__ of its own: this one is Saga's.
        super().__init__(params, deadline, at)

    def may_follow(self, after: str | None) -> None:
        """Refuses a participant whose step does not follow the saga's last succeeded step."""
        if after is None:
            if self.order:
                raise SagaError(f"saga has begun: its first step was {self.order[0]}")
        elif self.last_succeeded() != after:
            raise SagaError(f"step {after} has not succeeded as the saga's last step")


SAGA_KINDS: dict[str, type[Saga]] = {AGENT_SPAWNING: AgentSpawning, MESH_FORMATION: MeshFormation}
