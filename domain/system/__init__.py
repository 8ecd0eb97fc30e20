"""Seed 001's system events: the deployment's own record of what happened to it.

One ``System`` aggregate per deployment holds them (a low-rate family: a few
events a day; snapshots keep its load short). They go to ``system_events``.
Who records them:

* ``EmergencyStateActivated``: the writer, in the batch in which a saga is
  ABORTED (its compensation failed for good: a human must look);
* ``RecoveryProcessInitiated``: a saga runner that starts and finds open sagas
  to carry on;
* any of the four: an operator or another service, ``POST /api/v1/system/events``
  (``system_configuration_changed`` after changing a deployment's settings,
  ``optimization_cycle_completed`` after a tuning run...).

The read models do not show them; the audit API does (``/api/v1/audit/system/
system/events``), and so does every subscriber of the topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.audit import whole
from domain.family import Family, Ok, Result
from domain.ids import TADPOLE_NAMESPACE, UnknownIdError
from domain.lowrate import LowRateWork, low_rate
from domain.processor import UnitOfWork
from domain.values import compact_json

#: The one system aggregate of a deployment.
SYSTEM = uuid5(TADPOLE_NAMESPACE, "system")

#: Seed 001's system event types → the event class's name.
SEED_NAMES = {
    "system_configuration_changed": "ConfigurationChanged",
    "optimization_cycle_completed": "OptimizationCycleCompleted",
    "emergency_state_activated": "EmergencyStateActivated",
    "recovery_process_initiated": "RecoveryProcessInitiated",
}


class System(Aggregate):
    class Started(Aggregate.Created):
        at: datetime

    @event(Started)
    def __init__(self, at: datetime):
        self.started_at = at
        self.recorded = 0

    class ConfigurationChanged(Aggregate.Event):
        reason: str
        detail: str  # JSON object
        at: datetime

    class OptimizationCycleCompleted(Aggregate.Event):
        reason: str
        detail: str
        at: datetime

    class EmergencyStateActivated(Aggregate.Event):
        reason: str
        detail: str
        at: datetime

    class RecoveryProcessInitiated(Aggregate.Event):
        reason: str
        detail: str
        at: datetime

    def record(self, seed_name: str, reason: str, detail: dict[str, Any], at: datetime) -> None:
        cls = getattr(type(self), SEED_NAMES[seed_name])
        self.trigger_event(cls, reason=reason, detail=compact_json(detail), at=at)
        self.recorded += 1


@dataclass(frozen=True)
class RecordSystemEvent:
    kind: str  # one of SEED_NAMES
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


def system_of(uow: UnitOfWork) -> System:
    """The deployment's system aggregate, begun on first use."""
    system = uow.get(SYSTEM, System)
    if system is None:
        system = System._create(System.Started, id=SYSTEM, at=uow.now)
    return system


def record(uow: UnitOfWork, kind: str, reason: str, detail: dict[str, Any]) -> None:
    """Record a system event in this batch (for other families' handlers too)."""
    system = system_of(uow)
    system.record(kind, reason, detail, uow.now)
    uow.add(system)


class SystemWork(LowRateWork):
    def record(self, c: RecordSystemEvent) -> Result:
        record(self.uow, c.kind, c.reason, c.detail)
        return Ok()


def _parse(text: str) -> UUID:
    if text != "system":
        raise UnknownIdError(text)
    return SYSTEM


def _reads(c: RecordSystemEvent) -> Iterable[UUID]:
    return (SYSTEM,)


FAMILY = Family(
    name="system",
    events=(
        System.Started,
        System.ConfigurationChanged,
        System.OptimizationCycleCompleted,
        System.EmergencyStateActivated,
        System.RecoveryProcessInitiated,
    ),
    topic="system_events",
    handlers={RecordSystemEvent: SystemWork.record},
    state=low_rate(SystemWork),
    audit={"system": whole(_parse, System)},
    reads={RecordSystemEvent: _reads},
)

__all__ = ["FAMILY", "SEED_NAMES", "SYSTEM", "RecordSystemEvent", "System", "record"]
