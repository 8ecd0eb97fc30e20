"""A target: a machine (or pool) that agents are placed on, with seed 000's limits.

The target holds what it has promised: one reservation per agent placed on it
(made by the spawning saga's ``reserve_resources`` step, given back by
``release_resources`` or when the agent is terminated). A reservation is refused
when it would take the target past any of its limits, so, the writer deciding
one command after another, concurrent reservations never exceed them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.values import compact_json

# Seed 000's TargetState.
UNKNOWN, READY, BUSY, MAINTENANCE, ERROR = "UNKNOWN", "READY", "BUSY", "MAINTENANCE", "ERROR"
TARGET_STATES = (UNKNOWN, READY, BUSY, MAINTENANCE, ERROR)


class TargetError(RuntimeError):
    """A reservation the target cannot take; the message says which limit."""


@dataclass(frozen=True)
class Limits:
    """Seed 000's ResourceLimits."""

    cpu_millicores: int
    memory_bytes: int
    max_workloads: int


class Target(Aggregate):
    """One target (id: from the caller's target id)."""

    class Registered(Aggregate.Created):
        target_id: str
        state: str
        capabilities: str  # JSON object of strings
        cpu_millicores: int
        memory_bytes: int
        max_workloads: int
        at: datetime

    @classmethod
    def register(
        cls,
        uuid: UUID,
        target_id: str,
        state: str,
        capabilities: dict[str, str],
        limits: Limits,
        at: datetime,
    ) -> Target:
        return cls._create(
            cls.Registered,
            id=uuid,
            target_id=target_id,
            state=state,
            capabilities=compact_json(capabilities),
            cpu_millicores=limits.cpu_millicores,
            memory_bytes=limits.memory_bytes,
            max_workloads=limits.max_workloads,
            at=at,
        )

    @event(Registered)
    def __init__(
        self,
        target_id: str,
        state: str,
        capabilities: str,
        cpu_millicores: int,
        memory_bytes: int,
        max_workloads: int,
        at: datetime,
    ):
        self.target_id = target_id
        #: Agent id → its reservation: plain values (the snapshot stores them as they are).
        self.reservations: dict[str, dict[str, Any]] = {}
        self._set(state, capabilities, cpu_millicores, memory_bytes, max_workloads, at)

    def _set(
        self, state: str, capabilities: str, cpu: int, memory: int, workloads: int, at: datetime
    ) -> None:
        self.state = state
        self.capabilities: dict[str, str] = json.loads(capabilities)
        self.cpu_limit, self.memory_limit, self.max_workloads = cpu, memory, workloads
        self.updated_at = at

    @property
    def limits(self) -> Limits:
        return Limits(self.cpu_limit, self.memory_limit, self.max_workloads)

    class Updated(Aggregate.Event):
        state: str
        capabilities: str
        cpu_millicores: int
        memory_bytes: int
        max_workloads: int
        at: datetime

    @event(Updated)
    def _updated(
        self,
        state: str,
        capabilities: str,
        cpu_millicores: int,
        memory_bytes: int,
        max_workloads: int,
        at: datetime,
    ) -> None:
        self._set(state, capabilities, cpu_millicores, memory_bytes, max_workloads, at)

    def update(
        self, state: str, capabilities: dict[str, str], limits: Limits, at: datetime
    ) -> bool:
        """Seed 000's UpdateTarget; False (and no event) when nothing changes.

        Limits may go below what is reserved (the machine is what it is): nothing
        already placed is evicted, and no new reservation fits until usage does.
        """
        if state == self.state and capabilities == self.capabilities and limits == self.limits:
            return False
        self._updated(
            state,
            compact_json(capabilities),
            limits.cpu_millicores,
            limits.memory_bytes,
            limits.max_workloads,
            at,
        )
        return True

    # ---- reservations ----------------------------------------------------------------

    @property
    def used_cpu(self) -> int:
        return sum(r["cpu_millicores"] for r in self.reservations.values())

    @property
    def used_memory(self) -> int:
        return sum(r["memory_bytes"] for r in self.reservations.values())

    @property
    def workloads(self) -> int:
        """Seed 000's ``current_workloads``: the agents placed on this target."""
        return len(self.reservations)

    class Reserved(Aggregate.Event):
        agent: str
        saga: str
        cpu_millicores: int
        memory_bytes: int
        at: datetime

    @event(Reserved)
    def _reserved(
        self, agent: str, saga: str, cpu_millicores: int, memory_bytes: int, at: datetime
    ) -> None:
        self.reservations[agent] = {
            "saga": saga,
            "cpu_millicores": cpu_millicores,
            "memory_bytes": memory_bytes,
        }

    def reserve(self, agent: str, saga: str, cpu: int, memory: int, at: datetime) -> bool:
        """Hold ``cpu`` and ``memory`` (and one workload) for ``agent``.

        Idempotent per agent: a second reservation for an agent that holds one is
        a no-op (False). Raises :class:`TargetError` naming the limit it would pass.
        """
        if agent in self.reservations:
            return False
        t, limits = self.target_id, self.limits
        if self.state != READY:
            raise TargetError(f"target {t} is {self.state}: only a READY target takes agents")
        if self.workloads + 1 > limits.max_workloads:
            raise TargetError(
                f"target {t} holds {self.workloads} of its max_workloads {limits.max_workloads}"
            )
        if self.used_cpu + cpu > limits.cpu_millicores:
            raise TargetError(
                f"target {t} has {max(0, limits.cpu_millicores - self.used_cpu)} cpu_millicores "
                f"left of {limits.cpu_millicores}; the agent asks {cpu}"
            )
        if self.used_memory + memory > limits.memory_bytes:
            raise TargetError(
                f"target {t} has {max(0, limits.memory_bytes - self.used_memory)} memory_bytes "
                f"left of {limits.memory_bytes}; the agent asks {memory}"
            )
        self._reserved(agent, saga, cpu, memory, at)
        return True

    class Released(Aggregate.Event):
        agent: str
        at: datetime

    @event(Released)
    def _released(self, agent: str, at: datetime) -> None:
        del self.reservations[agent]

    def release(self, agent: str, at: datetime) -> bool:
        """Give back ``agent``'s reservation; False when it holds none (idempotent)."""
        if agent not in self.reservations:
            return False
        self._released(agent, at)
        return True
