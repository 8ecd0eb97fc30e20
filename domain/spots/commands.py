"""The spots family's commands and results."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hello:
    ip_address: str


@dataclass(frozen=True)
class Heartbeat:
    """A spot's sign of life; a figure left out keeps its last reported value."""

    spot_id: str
    ip_address: str | None = None
    cpu_load: float | None = None
    running_tasks: int | None = None
    total_cores: int | None = None


@dataclass(frozen=True)
class ClaimTasks:
    """A spot asks for up to ``max_tasks`` tasks; every family that hands out work offers some."""

    spot_id: str
    max_tasks: int


@dataclass(frozen=True)
class ClaimedTask:
    task_id: str
    payload: str
    fence: int


@dataclass(frozen=True)
class Claimed:
    tasks: list[ClaimedTask]


@dataclass(frozen=True)
class ReapSpots:
    """SpotReaper: spots silent for longer than ``timeout`` seconds go DOWN, and every
    family takes back the work they held."""

    timeout: float


@dataclass(frozen=True)
class SpotRegistered:
    spot_id: str
