"""An agent (seed 001): placed on a target, a member of at most one mesh.

Its events are seed 001's ``agent_spawned``, ``agent_performance_updated``,
``agent_capability_evolved`` and ``agent_terminated``, and two of its own for
membership (``MeshJoined``, ``MeshLeft``), so that the rule "an agent is in at
most one mesh" is checked where the agent's state is.
"""

from __future__ import annotations

import json
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.ids import agent_id
from domain.values import compact_json

ACTIVE, TERMINATED = "ACTIVE", "TERMINATED"


class AgentError(RuntimeError):
    """A change the agent refuses; the message says why."""


class Agent(Aggregate):
    """One agent (id: ``agent-<hex>``, chosen when its spawn saga starts)."""

    class Spawned(Aggregate.Created):
        target_id: str
        capabilities: str  # JSON object of strings
        cpu_millicores: int
        memory_bytes: int
        saga: str
        at: datetime

    @classmethod
    def spawn(
        cls,
        uuid: UUID,
        target_id: str,
        capabilities: dict[str, str],
        cpu_millicores: int,
        memory_bytes: int,
        saga: str,
        at: datetime,
    ) -> Agent:
        return cls._create(
            cls.Spawned,
            id=uuid,
            target_id=target_id,
            capabilities=compact_json(capabilities),
            cpu_millicores=cpu_millicores,
            memory_bytes=memory_bytes,
            saga=saga,
            at=at,
        )

    @event(Spawned)
    def __init__(
        self,
        target_id: str,
        capabilities: str,
        cpu_millicores: int,
        memory_bytes: int,
        saga: str,
        at: datetime,
    ):
        self.target_id = target_id
        self.capabilities: dict[str, str] = json.loads(capabilities)
        self.cpu_millicores = cpu_millicores
        self.memory_bytes = memory_bytes
        self.saga = saga
        self.state = ACTIVE
        self.mesh: str | None = None
        self.performance: dict[str, float] = {}
        self.spawned_at = at
        self.ended_at: datetime | None = None

    @property
    def public_id(self) -> str:
        return agent_id(self.id)

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def _check_active(self) -> None:
        if not self.active:
            raise AgentError("agent is terminated")

    class PerformanceUpdated(Aggregate.Event):
        metrics: str  # JSON object of numbers
        at: datetime

    @event(PerformanceUpdated)
    def _performance(self, metrics: str, at: datetime) -> None:
        self.performance.update(json.loads(metrics))

    def update_performance(self, metrics: dict[str, float], at: datetime) -> None:
        self._check_active()
        self._performance(compact_json(metrics), at)

    class CapabilityEvolved(Aggregate.Event):
        capabilities: str
        at: datetime

    @event(CapabilityEvolved)
    def _evolved(self, capabilities: str, at: datetime) -> None:
        self.capabilities = json.loads(capabilities)

    def evolve(self, capabilities: dict[str, str], at: datetime) -> bool:
        self._check_active()
        if capabilities == self.capabilities:
            return False
        self._evolved(compact_json(capabilities), at)
        return True

    class MeshJoined(Aggregate.Event):
        mesh: str
        at: datetime

    @event(MeshJoined)
    def _joined(self, mesh: str, at: datetime) -> None:
        self.mesh = mesh

    def check_join(self, mesh: str) -> bool:
        """Whether joining ``mesh`` changes anything; raises if the agent may not join it."""
        self._check_active()
        if self.mesh == mesh:
            return False
        if self.mesh is not None:
            raise AgentError(f"agent is a member of {self.mesh}: an agent is in at most one mesh")
        return True

    def join(self, mesh: str, at: datetime) -> None:
        if self.check_join(mesh):
            self._joined(mesh, at)

    class MeshLeft(Aggregate.Event):
        mesh: str
        at: datetime

    @event(MeshLeft)
    def _left(self, mesh: str, at: datetime) -> None:
        self.mesh = None

    def leave(self, mesh: str, at: datetime) -> bool:
        if self.mesh != mesh:
            return False
        self._left(mesh, at)
        return True

    class Terminated(Aggregate.Event):
        reason: str
        at: datetime

    @event(Terminated)
    def _terminated(self, reason: str, at: datetime) -> None:
        self.state = TERMINATED
        self.ended_at = at

    def terminate(self, reason: str, at: datetime) -> bool:
        """False when already terminated (idempotent). The agent must have left its mesh."""
        if not self.active:
            return False
        if self.mesh is not None:
            raise AgentError(f"agent is still a member of {self.mesh}")
        self._terminated(reason, at)
        return True
