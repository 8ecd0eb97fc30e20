"""Sagas (seed 001): agent spawning (orchestrated) and mesh formation (choreographed).

Open work: the sagas that are not final (their timers are fired from memory).
The saga runner and the participants that drive them live in ``sagas/``.
"""

from __future__ import annotations

from typing import Any

from domain.audit import History, whole
from domain.family import Family, Phase
from domain.ids import parse_saga_id
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
from domain.sagas.definitions import AGENT_SPAWNING, MESH_FORMATION, MESH_STEPS, SPAWN_STEPS
from domain.sagas.saga import SAGA_FINAL, SAGA_STATES, AgentSpawning, MeshFormation, Saga
from domain.sagas.state import OpenSagas, SagasWork, saga_reads

_EVENTS = (
    "Started",
    "StepStarted",
    "StepSucceeded",
    "StepFailed",
    "StepTimedOut",
    "CompensationStarted",
    "CompensationTaken",
    "StepCompensated",
    "CompensationFailed",
    "Completed",
    "Compensated",
    "Aborted",
)
_SPAWN_EVENTS = tuple(getattr(AgentSpawning, name) for name in _EVENTS)
_MESH_EVENTS = tuple(getattr(MeshFormation, name) for name in _EVENTS)

_views = [whole(parse_saga_id, AgentSpawning), whole(parse_saga_id, MeshFormation)]


def saga_history(entity_id: str, source: Any) -> History | None:
    for view in _views:
        found = view(entity_id, source)
        if found is not None:
            return found
    return None


FAMILY = Family(
    name="sagas",
    events=_SPAWN_EVENTS + _MESH_EVENTS,
    topic="agent_lifecycle",
    topics=dict.fromkeys(_MESH_EVENTS, "mesh_coordination"),
    handlers={
        StartSpawn: SagasWork.spawn,
        StartMeshFormation: SagasWork.form_mesh,
        TakeStep: SagasWork.take,
        FinishStep: SagasWork.finish,
        TakeCompensation: SagasWork.take_compensation,
        FinishCompensation: SagasWork.finish_compensation,
        FireSagaTimers: SagasWork.fire_timers,
    },
    phases={FireSagaTimers: Phase.FINISH},
    results=(SagaStarted, StepTaken, StepFinished, TimersFired),
    state=OpenSagas,
    open_when={
        AgentSpawning: lambda saga: not saga.is_final,
        MeshFormation: lambda saga: not saga.is_final,
    },
    audit={"saga": saga_history},
    reads={
        **dict.fromkeys((StartSpawn, StartMeshFormation), saga_reads),
        **dict.fromkeys((TakeStep, FinishStep, TakeCompensation, FinishCompensation), saga_reads),
    },
)

__all__ = [
    "AGENT_SPAWNING",
    "FAMILY",
    "MESH_FORMATION",
    "MESH_STEPS",
    "SAGA_FINAL",
    "SAGA_STATES",
    "SPAWN_STEPS",
    "AgentSpawning",
    "FinishCompensation",
    "FinishStep",
    "FireSagaTimers",
    "MeshFormation",
    "Saga",
    "SagaStarted",
    "StartMeshFormation",
    "StartSpawn",
    "StepFinished",
    "StepTaken",
    "TakeCompensation",
    "TakeStep",
    "TimersFired",
]
