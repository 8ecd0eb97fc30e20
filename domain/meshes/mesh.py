"""A mesh of agents (seed 001): its topology, required capabilities and size bounds.

Its constraints are checked here: a member has every required capability (the
same value), the mesh never holds more than ``max_members``, and an ACTIVE
mesh (one that has reached ``min_members``) is not taken below it by a member
leaving — dissolve it instead. Undoing a saga's own join (its compensation)
always goes through: the mesh then goes back to PENDING if it falls below its
minimum. That an agent is in at most one mesh is the agent's rule
(:meth:`domain.agents.agent.Agent.check_join`); registering checks both before
either changes.
"""

from __future__ import annotations

import json
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.values import compact_json

PENDING, ACTIVE, DISSOLVED = "PENDING", "ACTIVE", "DISSOLVED"
TOPOLOGIES = ("full", "star", "ring", "tree", "hierarchical")


class MeshError(RuntimeError):
    """A change that would break one of the mesh's constraints; the message says which."""


class Mesh(Aggregate):
    """One mesh (id: ``mesh-<hex>``, chosen when its formation saga starts)."""

    class Formed(Aggregate.Created):
        topology: str
        required_capabilities: str  # JSON object of strings
        min_members: int
        max_members: int
        saga: str
        at: datetime

    @classmethod
    def form(
        cls,
        uuid: UUID,
        topology: str,
        required: dict[str, str],
        min_members: int,
        max_members: int,
        saga: str,
        at: datetime,
    ) -> Mesh:
        return cls._create(
            cls.Formed,
            id=uuid,
            topology=topology,
            required_capabilities=compact_json(required),
            min_members=min_members,
            max_members=max_members,
            saga=saga,
            at=at,
        )

    @event(Formed)
    def __init__(
        self,
        topology: str,
        required_capabilities: str,
        min_members: int,
        max_members: int,
        saga: str,
        at: datetime,
    ):
        self.topology = topology
        self.required: dict[str, str] = json.loads(required_capabilities)
        self.min_members = min_members
        self.max_members = max_members
        self.saga = saga
        self.members: list[str] = []
        self.performance: dict[str, float] = {}
        self.dissolved = False
        self.formed_at = at
        self.ended_at: datetime | None = None

    @property
    def state(self) -> str:
        if self.dissolved:
            return DISSOLVED
        return ACTIVE if len(self.members) >= self.min_members else PENDING

    class TopologyChanged(Aggregate.Event):
        """Who joined and left, and the size after: not the whole membership, which
        would make every join of an n-member mesh an event of n ids."""

        joined: list[str]
        left: list[str]
        size: int
        at: datetime

    @event(TopologyChanged)
    def _changed(self, joined: list[str], left: list[str], size: int, at: datetime) -> None:
        self.members = [m for m in self.members if m not in left] + [
            a for a in joined if a not in self.members
        ]

    def check_join(self, agent: str, capabilities: dict[str, str]) -> bool:
        """Whether ``agent`` joining changes anything; raises :class:`MeshError` naming the
        constraint it would break."""
        if self.dissolved:
            raise MeshError("mesh is dissolved")
        if agent in self.members:
            return False
        missing = {k: v for k, v in self.required.items() if capabilities.get(k) != v}
        if missing:
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
            raise MeshError(f"agent lacks the mesh's required capabilities: {wanted}")
        if len(self.members) + 1 > self.max_members:
            raise MeshError(f"mesh is full: {len(self.members)} of max_members {self.max_members}")
        return True

    def join(self, agent: str, capabilities: dict[str, str], at: datetime) -> None:
        if self.check_join(agent, capabilities):
            self._changed([agent], [], len(self.members) + 1, at)

    def leave(self, agent: str, at: datetime, undo: bool = False) -> bool:
        """``agent`` leaves; ``undo``: a saga undoing its own join, never refused."""
        if agent not in self.members:
            return False
        if not undo and self.state == ACTIVE and len(self.members) - 1 < self.min_members:
            raise MeshError(
                f"mesh has {len(self.members)} members and min_members {self.min_members}: "
                "dissolve it instead"
            )
        self._changed([], [agent], len(self.members) - 1, at)
        return True

    class PerformanceImproved(Aggregate.Event):
        metrics: str  # JSON object of numbers
        at: datetime

    @event(PerformanceImproved)
    def _improved(self, metrics: str, at: datetime) -> None:
        self.performance.update(json.loads(metrics))

    def improve(self, metrics: dict[str, float], at: datetime) -> None:
        if self.dissolved:
            raise MeshError("mesh is dissolved")
        self._improved(compact_json(metrics), at)

    class Dissolved(Aggregate.Event):
        reason: str
        at: datetime

    @event(Dissolved)
    def _dissolved(self, reason: str, at: datetime) -> None:
        self.dissolved = True
        self.members = []
        self.ended_at = at

    def dissolve(self, reason: str, at: datetime) -> list[str]:
        """Every member leaves and the mesh ends; the members it had (their agents must be
        told). Nothing when already dissolved."""
        if self.dissolved:
            return []
        members = list(self.members)
        self._dissolved(reason, at)
        return members
