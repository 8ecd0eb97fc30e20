"""The jobs family's commands and results."""

from __future__ import annotations

from dataclasses import dataclass

from domain.jobs.sweeps import Sweep
from domain.jobs.tasks import Outcome


@dataclass(frozen=True)
class CreateJob:
    sweep: Sweep
    idempotency_key: str | None = None


@dataclass(frozen=True)
class CompleteTask:
    task_id: str
    spot_id: str
    fence: int | None
    runtime_ms: int | None
    iter: int | None
    fopt: float | None
    result_json: str | None


@dataclass(frozen=True)
class FailTask:
    task_id: str
    spot_id: str
    fence: int | None
    error: str
    retriable: bool


@dataclass(frozen=True)
class ReapTasks:
    """TaskReaper: RUNNING tasks whose holder was silent for ``threshold`` seconds."""

    threshold: float


@dataclass(frozen=True)
class ReleaseClaims:
    """Undo claims whose answer never reached their spot, if they were stored.

    The writer issues it after a batch whose append failed without saying whether
    it was stored (the connection lost after the commit): each ``(task id, spot,
    fence)`` still RUNNING under that spot with that fence goes back to NEW (or
    FAILED, its attempts used), as a reap. A claim that was not stored changes
    nothing.
    """

    claims: tuple[tuple[str, str, int], ...]
    reason: str = "claim answer lost"


@dataclass(frozen=True)
class JobCreated:
    job_id: str
    total_tasks: int
    replayed: bool


@dataclass(frozen=True)
class Finished:
    """Answer to complete or fail: the outcome, and for fail whether it retries."""

    outcome: Outcome
    will_retry: bool = False
