"""Spots: worker nodes that register, heartbeat, claim and report."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.ids import spot_id

UP, DOWN = "UP", "DOWN"


class Spot(Aggregate):
    """A worker node. Its liveness is judged from heartbeats; its changes of status
    and (throttled) reported load are stored."""

    class Registered(Aggregate.Created):
        ip_address: str
        at: datetime

    @event(Registered)
    def __init__(self, ip_address: str, at: datetime):
        self.ip_address = ip_address
        self.status = UP
        self.registered_at = at
        self.last_heartbeat = at
        self.cpu_load = 0.0
        self.running_tasks = 0
        self.total_cores = 0

    @classmethod
    def register(cls, uuid: UUID, ip_address: str, at: datetime) -> Spot:
        return cls._create(cls.Registered, id=uuid, ip_address=ip_address, at=at)

    @property
    def public_id(self) -> str:
        return spot_id(self.id)

    def figures(self) -> tuple[str, float, int, int]:
        return (self.ip_address, self.cpu_load, self.running_tasks, self.total_cores)

    class HeartbeatRecorded(Aggregate.Event):
        ip_address: str
        cpu_load: float
        running_tasks: int
        total_cores: int
        at: datetime

    @event(HeartbeatRecorded)
    def record_heartbeat(
        self, ip_address: str, cpu_load: float, running_tasks: int, total_cores: int, at: datetime
    ) -> None:
        self.ip_address = ip_address
        self.cpu_load = cpu_load
        self.running_tasks = running_tasks
        self.total_cores = total_cores
        self.last_heartbeat = at

    class MarkedDown(Aggregate.Event):
        reason: str
        at: datetime

    def mark_down(self, reason: str, at: datetime) -> None:
        if self.status == DOWN:
            return
        self._mark_down(reason, at)

    @event(MarkedDown)
    def _mark_down(self, reason: str, at: datetime) -> None:
        self.status = DOWN

    class CameUp(Aggregate.Event):
        at: datetime

    def come_up(self, at: datetime) -> None:
        if self.status == UP:
            return
        self._come_up(at)

    @event(CameUp)
    def _come_up(self, at: datetime) -> None:
        self.status = UP
