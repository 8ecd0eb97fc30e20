"""The sagas family's commands and results.

``StartSpawn`` and ``StartMeshFormation`` come from the API; the rest from saga
runners and participants (``sagas/``), through the API's saga-runner routes,
and ``FireSagaTimers`` from the writer's timer loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID


@dataclass(frozen=True)
class StartSpawn:
    saga: UUID
    agent: UUID
    target_id: str
    mesh: UUID | None
    capabilities: dict[str, str]
    cpu_millicores: int
    memory_bytes: int


@dataclass(frozen=True)
class StartMeshFormation:
    saga: UUID
    mesh: UUID
    topology: str
    required_capabilities: dict[str, str]
    min_members: int
    max_members: int


@dataclass(frozen=True)
class TakeStep:
    """Start a step under a lease. Orchestrated sagas choose the step (leave ``step``
    None); a participant of a choreographed one names its step, the step it follows
    (``after``, None for the first), its timeout and its compensation."""

    saga: UUID
    driver: str
    step: str | None = None
    after: str | None = None
    timeout_seconds: float | None = None
    compensation: str | None = None


@dataclass(frozen=True)
class FinishStep:
    """A taken step's report. ``apply``: the built-in handler ran, so the writer makes
    the step's effect (:mod:`domain.sagas.effects`) in this batch; if the effect is
    refused, the step fails with the reason. ``final``: a participant's last step."""

    saga: UUID
    step: str
    driver: str
    fence: int
    ok: bool
    outcome: Any = None  # a JSON value
    error: str = ""
    apply: bool = False
    final: bool = False
    #: Also take, in the same batch, what the saga needs next from this driver: its next
    #: step (orchestrated sagas), or its first compensation if this report started one.
    take_next: bool = False


@dataclass(frozen=True)
class TakeCompensation:
    saga: UUID
    driver: str
    step: str | None = None  # only if the next to compensate is this step


@dataclass(frozen=True)
class FinishCompensation:
    saga: UUID
    step: str
    driver: str
    fence: int
    ok: bool
    outcome: Any = None
    error: str = ""
    apply: bool = False
    #: Also take the next compensation, in the same batch.
    take_next: bool = False


@dataclass(frozen=True)
class FireSagaTimers:
    """Steps and compensations past their deadline, and sagas past theirs (the timer loop)."""


@dataclass(frozen=True)
class SagaStarted:
    saga_id: str
    kind: str
    created: bool
    agent_id: str | None = None
    mesh_id: str | None = None


@dataclass(frozen=True)
class StepTaken:
    """A step or compensation taken: what its handler needs."""

    saga_id: str
    kind: str
    step: str
    compensation: str
    fence: int
    deadline: datetime
    params: dict[str, Any]
    outcome: Any = None  # for a compensation: what its step reported


@dataclass(frozen=True)
class StepFinished:
    saga_id: str
    step: str
    step_state: str
    saga_state: str
    error: str | None = None
    #: What ``take_next`` took (None: nothing to take now).
    next: StepTaken | None = None


@dataclass(frozen=True)
class TimersFired:
    sagas: list[str]
