"""The agents family's commands (an agent is spawned by its saga, not by a command here)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class UpdateAgentPerformance:
    agent: UUID
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvolveAgentCapabilities:
    agent: UUID
    capabilities: dict[str, str]


@dataclass(frozen=True)
class TerminateAgent:
    """Ends the agent: it leaves its mesh and its target's reservation is given back."""

    agent: UUID
    reason: str
