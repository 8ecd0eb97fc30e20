"""A workflow run: one aggregate holds the run's state and every task's.

Its events are few per task (claimed, renewed, completed, failed...), so one
run is one aggregate and every invariant is checked in it:

* a task is RUNNING under at most one lease (holder and fence token);
* each claim gives the task a fence one higher than its last; only the lease's
  holder with that fence may renew, complete or fail it;
* a task becomes READY when all it depends on are DONE, and is claimable from
  its ``ready_at`` (a backoff after a failed attempt);
* a task fails for good after ``max_attempts`` attempts; then the run fails and,
  when the definition says so, compensates;
* compensation runs the compensations of the DONE tasks one by one, in reverse
  completion order, each a leased task itself;
* a paused run dispatches nothing new; a cancelled, completed, failed or
  compensated run takes no report.

Timers (lease expiry, backoff, timeout) are timestamps in the events, so they
survive any restart; firing one is an event, refused when already fired.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import Transcoding

from domain.workflows.definitions import Definition, TaskSpec, parsed

# Run states.
RUNNING, PAUSED, CANCELLED = "RUNNING", "PAUSED", "CANCELLED"
COMPLETED, FAILED, COMPENSATING, COMPENSATED = "COMPLETED", "FAILED", "COMPENSATING", "COMPENSATED"
RUN_FINAL = frozenset({CANCELLED, COMPLETED, FAILED, COMPENSATED})
# Task states (RUNNING is shared with the run's).
PENDING, READY, DONE, SKIPPED = "PENDING", "READY", "DONE", "SKIPPED"
TASK_FINAL = frozenset({DONE, FAILED, SKIPPED, CANCELLED})

#: Suffix of a compensation task's id: ``provision~compensate`` undoes ``provision``.
COMPENSATE = "~compensate"

_TEMPLATE = re.compile(r"^\$\{(input|tasks)((?:\.[A-Za-z0-9_-]+)*)\}$")


@dataclass
class TaskState:
    """One task of a run, as the run holds it."""

    id: str
    status: str = PENDING
    attempts: int = 0
    fence: int = 0
    holder: str | None = None
    lease_expires: float | None = None
    deadline: float | None = None
    ready_at: float = 0.0
    output: str | None = None
    error: str | None = None
    completed_seq: int = 0
    input: str | None = None  # a retry's new input (JSON), else the run's

    @property
    def is_compensation(self) -> bool:
        return self.id.endswith(COMPENSATE)


class TaskStateAsDict(Transcoding):
    """How a run's snapshot stores its tasks."""

    type = TaskState
    name = "workflow_task_state"

    def encode(self, obj: TaskState) -> dict[str, Any]:
        return asdict(obj)

    def decode(self, data: dict[str, Any]) -> TaskState:
        return TaskState(**data)


class WorkflowRun(Aggregate):
    """One run of a registered workflow version (id: from namespace, name and run id)."""

    class Started(Aggregate.Created):
        namespace: str
        name: str
        workflow_version: str
        run_id: str
        definition: str
        input: str
        at: datetime

    @event(Started)
    def __init__(
        self,
        namespace: str,
        name: str,
        workflow_version: str,
        run_id: str,
        definition: str,
        input: str,
        at: datetime,
    ):
        self.namespace = namespace
        self.name = name
        self.workflow_version = workflow_version
        self.run_id = run_id
        self.definition_json = definition
        self.input = input
        self.state = RUNNING
        self.started_at = at
        self.ended_at: datetime | None = None
        self.tasks: dict[str, TaskState] = {t.id: TaskState(t.id) for t in self.spec.tasks}
        self.completions = 0
        #: Compensation tasks still to run, the next first.
        self.to_compensate: list[str] = []
        self._promote(at.timestamp())

    @classmethod
    def start(
        cls, uuid: UUID, definition: str, run_id: str, input_json: str, at: datetime
    ) -> WorkflowRun:
        """A run of the stored definition text ``definition``."""
        d = parsed(definition)
        return cls._create(
            cls.Started,
            id=uuid,
            namespace=d.namespace,
            name=d.name,
            workflow_version=d.version,
            run_id=run_id,
            definition=definition,
            input=input_json,
            at=at,
        )

    # ---- queries ---------------------------------------------------------------------

    @property
    def spec(self) -> Definition:
        return parsed(self.definition_json)

    def task_spec(self, task_id: str) -> TaskSpec:
        return self.spec.by_id[task_id.removesuffix(COMPENSATE)]

    @property
    def is_final(self) -> bool:
        return self.state in RUN_FINAL

    @property
    def under_way(self) -> bool:
        """True once a task of the run was tried."""
        return any(t.attempts for t in self.tasks.values())

    def dispatching(self) -> bool:
        return self.state in (RUNNING, COMPENSATING)

    def claimable(self, now: float) -> list[TaskState]:
        """READY tasks whose backoff is over, if the run dispatches."""
        if not self.dispatching():
            return []
        return [t for t in self.tasks.values() if t.status == READY and t.ready_at <= now]

    def next_ready_at(self) -> float | None:
        """When the next READY task becomes claimable (None: none waits)."""
        times = [t.ready_at for t in self.tasks.values() if t.status == READY]
        return min(times) if times and self.dispatching() else None

    def due(self, now: float) -> list[tuple[TaskState, str]]:
        """RUNNING tasks whose lease or timeout has passed, with which."""
        found = []
        for t in self.tasks.values():
            if t.status != RUNNING:
                continue
            if t.deadline is not None and now >= t.deadline:
                found.append((t, "timeout"))
            elif t.lease_expires is not None and now >= t.lease_expires:
                found.append((t, "lease expired"))
        return found

    def resolved_input(self, task: TaskState) -> dict[str, Any]:
        """What a task is given: the run's input (or its retry's) and its dependencies' outputs."""
        spec = self.task_spec(task.id)
        outputs = {
            dep: json.loads(self.tasks[dep].output or "null") for dep in self._inputs_of(task, spec)
        }
        return {"input": json.loads(task.input or self.input), "tasks": outputs}

    def _inputs_of(self, task: TaskState, spec: TaskSpec) -> tuple[str, ...]:
        if task.is_compensation:
            return (spec.id,)  # a compensation sees what its task produced
        return spec.depends_on

    def payload(self, task: TaskState) -> dict[str, Any]:
        """The task's payload with its ``${input.x}`` / ``${tasks.t.y}`` templates resolved."""
        spec = self.task_spec(task.id)
        template = (
            (spec.compensation or {}).get("payload", {}) if task.is_compensation else spec.payload
        )
        resolved: dict[str, Any] = _resolve(template, self.resolved_input(task))
        return resolved

    # ---- commands ----------------------------------------------------------------------

    def claim(self, task_id: str, holder: str, lease_seconds: float, at: datetime) -> int:
        task = self.tasks[task_id]
        if task.status != READY or not self.dispatching():
            raise RunError(f"task {task_id} is not claimable")
        spec = self.task_spec(task_id)
        deadline = None
        if spec.timeout_seconds is not None and not task.is_compensation:
            deadline = at + timedelta(seconds=spec.timeout_seconds)
        self._claimed(
            task=task_id,
            holder=holder,
            fence=task.fence + 1,
            attempt=task.attempts + 1,
            lease_expires=at + timedelta(seconds=lease_seconds),
            deadline=deadline,
            at=at,
        )
        return task.fence

    class TaskClaimed(Aggregate.Event):
        task: str
        holder: str
        fence: int
        attempt: int
        lease_expires: datetime
        deadline: datetime | None
        at: datetime

    @event(TaskClaimed)
    def _claimed(
        self,
        task: str,
        holder: str,
        fence: int,
        attempt: int,
        lease_expires: datetime,
        deadline: datetime | None,
        at: datetime,
    ) -> None:
        t = self.tasks[task]
        t.status, t.holder, t.fence, t.attempts = RUNNING, holder, fence, attempt
        t.lease_expires = lease_expires.timestamp()
        t.deadline = deadline.timestamp() if deadline is not None else None
        t.error = None

    def check_lease(self, task_id: str, holder: str, fence: int | None) -> TaskState:
        """The task if ``holder`` holds its lease with ``fence``; else a RunError saying why."""
        task = self.tasks.get(task_id)
        if task is None:
            raise RunNotFound(f"run has no task {task_id!r}")
        if self.is_final:
            raise RunError(f"the run is {self.state}")
        if task.status != RUNNING or task.holder != holder:
            raise RunError("task not leased to this spot")
        if fence is not None and fence != task.fence:
            raise RunError("stale fencing token")
        return task

    def renew(
        self, task_id: str, holder: str, fence: int, lease_seconds: float, at: datetime
    ) -> datetime:
        self.check_lease(task_id, holder, fence)
        expires = at + timedelta(seconds=lease_seconds)
        self._renewed(task=task_id, fence=fence, lease_expires=expires, at=at)
        return expires

    class LeaseRenewed(Aggregate.Event):
        task: str
        fence: int
        lease_expires: datetime
        at: datetime

    @event(LeaseRenewed)
    def _renewed(self, task: str, fence: int, lease_expires: datetime, at: datetime) -> None:
        self.tasks[task].lease_expires = lease_expires.timestamp()

    def complete(
        self, task_id: str, holder: str, fence: int | None, output: str, at: datetime
    ) -> None:
        task = self.check_lease(task_id, holder, fence)
        self._completed(task=task_id, fence=task.fence, output=output, at=at)

    class TaskCompleted(Aggregate.Event):
        task: str
        fence: int
        output: str
        at: datetime

    @event(TaskCompleted)
    def _completed(self, task: str, fence: int, output: str, at: datetime) -> None:
        t = self.tasks[task]
        t.status, t.holder, t.lease_expires, t.deadline = DONE, None, None, None
        t.output = output
        self.completions += 1
        t.completed_seq = self.completions
        self._advance(at)

    def fail(
        self,
        task_id: str,
        holder: str,
        fence: int | None,
        error: str,
        retriable: bool,
        jitter: float,
        at: datetime,
    ) -> bool:
        """Fail the holder's attempt; whether the task will be tried again."""
        task = self.check_lease(task_id, holder, fence)
        return self._fail_attempt(task, error, retriable, jitter, at)

    def expire(self, task_id: str, reason: str, jitter: float, at: datetime) -> bool:
        """A timer fired (lease expired, timed out, holder gone): the attempt fails."""
        task = self.tasks[task_id]
        if task.status != RUNNING:
            raise RunError(f"task {task_id} is not RUNNING")
        return self._fail_attempt(task, reason, True, jitter, at)

    def _fail_attempt(
        self, task: TaskState, error: str, retriable: bool, jitter: float, at: datetime
    ) -> bool:
        retry = self.task_spec(task.id).retry
        again = retriable and task.attempts < retry.max_attempts
        retry_at = at + timedelta(seconds=retry.delay(task.attempts, jitter)) if again else None
        self._failed(task=task.id, fence=task.fence, error=error, retry_at=retry_at, at=at)
        return again

    class AttemptFailed(Aggregate.Event):
        task: str
        fence: int
        error: str
        retry_at: datetime | None
        at: datetime

    @event(AttemptFailed)
    def _failed(
        self, task: str, fence: int, error: str, retry_at: datetime | None, at: datetime
    ) -> None:
        t = self.tasks[task]
        t.holder, t.lease_expires, t.deadline, t.error = None, None, None, error
        if retry_at is not None:
            t.status, t.ready_at = READY, retry_at.timestamp()
            return
        t.status = FAILED
        if t.is_compensation:
            self.state, self.ended_at = FAILED, at  # a compensation that fails needs a human
            return
        if self.spec.compensate_on_failure and self._done_tasks():
            self._begin_compensation(self._done_tasks())
        else:
            self.state, self.ended_at = FAILED, at
            self._skip_rest()

    def pause(self, at: datetime) -> None:
        if self.state != RUNNING:
            raise RunError(f"only a RUNNING run can be paused; this one is {self.state}")
        self._paused(at=at)

    class Paused(Aggregate.Event):
        at: datetime

    @event(Paused)
    def _paused(self, at: datetime) -> None:
        self.state = PAUSED

    def resume(self, at: datetime) -> None:
        if self.state != PAUSED:
            raise RunError(f"only a PAUSED run can be resumed; this one is {self.state}")
        self._resumed(at=at)

    class Resumed(Aggregate.Event):
        at: datetime

    @event(Resumed)
    def _resumed(self, at: datetime) -> None:
        self.state = RUNNING

    def cancel(self, at: datetime) -> None:
        if self.is_final:
            raise RunError(f"the run is already {self.state}")
        self._cancelled(at=at)

    class Cancelled(Aggregate.Event):
        at: datetime

    @event(Cancelled)
    def _cancelled(self, at: datetime) -> None:
        self.state, self.ended_at = CANCELLED, at
        for t in self.tasks.values():
            if t.status not in TASK_FINAL:
                t.status, t.holder, t.lease_expires, t.deadline = CANCELLED, None, None, None

    def compensate(self, from_task: str, at: datetime) -> None:
        if from_task not in self.spec.by_id:
            raise RunNotFound(f"the workflow has no task {from_task!r}")
        if self.state not in (RUNNING, PAUSED, FAILED, COMPLETED):
            raise RunError(f"a {self.state} run cannot be compensated")
        start = self.tasks[from_task]
        if start.status != DONE:
            raise RunError(f"task {from_task!r} is {start.status}, not DONE")
        chosen = [t for t in self._done_tasks() if t.completed_seq <= start.completed_seq]
        self._compensation(from_task=from_task, tasks=[t.id for t in chosen], at=at)

    class CompensationStarted(Aggregate.Event):
        from_task: str
        tasks: list[str]
        at: datetime

    @event(CompensationStarted)
    def _compensation(self, from_task: str, tasks: list[str], at: datetime) -> None:
        by_id = {t.id: t for t in self._done_tasks()}
        self._begin_compensation([by_id[i] for i in tasks if i in by_id])

    def retry_task(self, task_id: str, input_json: str | None, at: datetime) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            raise RunNotFound(f"run has no task {task_id!r}")
        if task.status != FAILED or task.is_compensation:
            raise RunError(f"task {task_id!r} is {task.status}: only a FAILED task is retried")
        if self.state not in (FAILED, RUNNING, PAUSED):
            raise RunError(f"a {self.state} run cannot retry a task")
        self._retried(task=task_id, input=input_json, at=at)

    class TaskRetried(Aggregate.Event):
        task: str
        input: str | None
        at: datetime

    @event(TaskRetried)
    def _retried(self, task: str, input: str | None, at: datetime) -> None:
        t = self.tasks[task]
        t.status, t.attempts, t.ready_at, t.error = READY, 0, at.timestamp(), None
        if input is not None:
            t.input = input
        if self.state == FAILED:
            self.state, self.ended_at = RUNNING, None
        for other in self.tasks.values():
            if other.status == SKIPPED:
                other.status = PENDING
        self._promote(at.timestamp())

    class StateChanged(Aggregate.Event):
        previous: str
        state: str
        at: datetime

    @event(StateChanged)
    def _state_changed(self, previous: str, state: str, at: datetime) -> None:
        self.state = state
        if state in RUN_FINAL and self.ended_at is None:
            self.ended_at = at

    # ---- how the run moves on -----------------------------------------------------------

    def _done_tasks(self) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.status == DONE and not t.is_compensation]

    def _begin_compensation(self, tasks: list[TaskState]) -> None:
        """Compensate ``tasks`` in reverse completion order (those that have a compensation)."""
        order = sorted(tasks, key=lambda t: t.completed_seq, reverse=True)
        self.to_compensate = [
            t.id + COMPENSATE for t in order if self.task_spec(t.id).compensation is not None
        ]
        for t in self.tasks.values():
            if not t.is_compensation and t.status in (PENDING, READY, RUNNING):
                t.status, t.holder, t.lease_expires, t.deadline = SKIPPED, None, None, None
        self.state, self.ended_at = COMPENSATING, None
        self._next_compensation(None)

    def _next_compensation(self, at: datetime | None) -> None:
        if not self.to_compensate:
            self.state, self.ended_at = COMPENSATED, at
            return
        cid = self.to_compensate.pop(0)
        self.tasks[cid] = TaskState(cid, status=READY)

    def _advance(self, at: datetime) -> None:
        if self.state == COMPENSATING:
            self._next_compensation(at)
            return
        self._promote(at.timestamp())
        if all(t.status == DONE for t in self.tasks.values() if not t.is_compensation):
            self.state, self.ended_at = COMPLETED, at

    def _promote(self, now: float) -> None:
        """Tasks whose dependencies are all DONE become READY."""
        for spec in self.spec.tasks:
            t = self.tasks[spec.id]
            if t.status == PENDING and all(self.tasks[d].status == DONE for d in spec.depends_on):
                t.status, t.ready_at = READY, now

    def _skip_rest(self) -> None:
        for t in self.tasks.values():
            if t.status in (PENDING, READY):
                t.status = SKIPPED


def _records_state(method: Any) -> Any:
    """Wrap a command: when it changed the run's state, a ``StateChanged`` event says so
    (what read models and subscribers see, without re-deriving the run's rules)."""

    def wrapper(self: WorkflowRun, *args: Any, **kwargs: Any) -> Any:
        before = self.state
        result = method(self, *args, **kwargs)
        if self.state != before:
            at = kwargs.get("at") or args[-1]
            self._state_changed(previous=before, state=self.state, at=at)
        return result

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


for _name in (
    "complete",
    "fail",
    "expire",
    "pause",
    "resume",
    "cancel",
    "compensate",
    "retry_task",
):
    setattr(WorkflowRun, _name, _records_state(getattr(WorkflowRun, _name)))


class RunError(RuntimeError):
    """A change the run refuses in its current state (409)."""


class RunNotFound(LookupError):
    """The run has no such task (404)."""


def _resolve(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, str):
        match = _TEMPLATE.match(value)
        if match is None:
            return value
        found: Any = context[match.group(1)]
        for part in match.group(2).split(".")[1:]:
            if isinstance(found, dict) and part in found:
                found = found[part]
            elif part == "output" and match.group(1) == "tasks":
                continue
            else:
                return None
        return found
    if isinstance(value, dict):
        return {k: _resolve(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, context) for v in value]
    return value
