"""The workflows family's commands and results."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from domain.workflows.definitions import Definition


@dataclass(frozen=True)
class RegisterWorkflow:
    definition: Definition


@dataclass(frozen=True)
class StartRun:
    namespace: str
    name: str
    run_id: str
    input: str  # JSON


@dataclass(frozen=True)
class PauseRun:
    instance: UUID


@dataclass(frozen=True)
class ResumeRun:
    instance: UUID


@dataclass(frozen=True)
class CancelRun:
    instance: UUID


@dataclass(frozen=True)
class CompensateRun:
    instance: UUID
    from_task: str


@dataclass(frozen=True)
class RetryWorkflowTask:
    instance: UUID
    task: str
    input: str | None  # JSON; None keeps the input it had


@dataclass(frozen=True)
class CompleteWorkflowTask:
    task_id: str  # wtask-<run hex>-<task>
    spot_id: str
    fence: int | None
    output: str  # JSON object


@dataclass(frozen=True)
class FailWorkflowTask:
    task_id: str
    spot_id: str
    fence: int | None
    error: str
    retriable: bool


@dataclass(frozen=True)
class RenewLease:
    task_id: str
    spot_id: str
    fence: int


@dataclass(frozen=True)
class FireTimers:
    """Expired leases and timeouts fail their attempts (the timer loop sends it)."""


@dataclass(frozen=True)
class WorkflowRegistered:
    namespace: str
    name: str
    version: str
    created: bool


@dataclass(frozen=True)
class RunStarted:
    instance_id: UUID
    created: bool


@dataclass(frozen=True)
class TaskReported:
    """A workflow task's complete or fail was taken; for fail, whether it is retried."""

    will_retry: bool | None = None


@dataclass(frozen=True)
class LeaseExtended:
    expires_at: datetime
