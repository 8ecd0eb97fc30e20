"""The meshes family's commands (a mesh is formed by its saga, not by a command here)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class ImproveMeshPerformance:
    mesh: UUID
    metrics: dict[str, float]


@dataclass(frozen=True)
class LeaveMesh:
    """An agent leaves its mesh (refused if that takes an ACTIVE mesh below its minimum)."""

    mesh: UUID
    agent: UUID


@dataclass(frozen=True)
class DissolveMesh:
    mesh: UUID
    reason: str
