"""The workflows family's state (open runs in memory) and its part of a batch.

Runs are a low-rate family: every handler loads, decides and adds its run
through the batch's unit of work. Open runs (not yet completed, failed,
compensated or cancelled) stay in memory, because claims and timers look at
them all; definitions are loaded on demand.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from uuid import UUID

from domain.family import (
    Config,
    ConflictError,
    HolderDue,
    Loader,
    NotFoundError,
    Ok,
    Phase,
    Reaped,
    Recent,
    Result,
)
from domain.ids import UnknownIdError
from domain.processor import UnitOfWork
from domain.spots.commands import ClaimedTask
from domain.workflows.commands import (
    CancelRun,
    CompensateRun,
    CompleteWorkflowTask,
    FailWorkflowTask,
    FireTimers,
    LeaseExtended,
    PauseRun,
    RegisterWorkflow,
    RenewLease,
    ResumeRun,
    RetryWorkflowTask,
    RunStarted,
    StartRun,
    TaskReported,
    WorkflowRegistered,
)
from domain.workflows.definition import WorkflowDefinition
from domain.workflows.ids import definition_uuid, parse_workflow_task_id, run_uuid, workflow_task_id
from domain.workflows.run import READY, RUNNING, RunError, RunNotFound, WorkflowRun


class OpenRuns:
    """Runs that are not final, in memory; the rest loaded on demand."""

    def __init__(self, config: Config):
        self.lease_seconds = config.lease_seconds
        self.runs: dict[UUID, WorkflowRun] = {}
        #: Open runs with a READY task, and with a RUNNING one: what claims and timers
        #: look at, so that neither walks every open run. Claims take the READY tasks
        #: of runs under way (a task of theirs was tried) before those of runs not yet
        #: begun: a run's next step is not queued behind every run started after it.
        self.ready_next: dict[UUID, None] = {}
        self.ready_first: dict[UUID, None] = {}
        self.running: dict[UUID, None] = {}
        self.recent: Recent[UUID, WorkflowRun | WorkflowDefinition] = Recent(config.recent)
        #: Chooses the jitter of a retry's backoff (a parameter for tests).
        self.jitter: Callable[[], float] = random.random

    def recover(self, load: Loader, open_ids: Iterable[UUID], now: datetime) -> None:
        for kept in (self.runs, self.ready_next, self.ready_first, self.running):
            kept.clear()
        self.recent.clear()
        for uuid in open_ids:
            run = load(uuid, WorkflowRun)
            if run is not None:
                self.keep(run)

    def held(self, uuid: UUID) -> WorkflowRun | WorkflowDefinition | None:
        return self.runs.get(uuid) or self.recent.get(uuid)

    def keep(self, aggregate: object) -> None:
        if isinstance(aggregate, WorkflowRun) and not aggregate.is_final:
            uuid = aggregate.id
            self.runs[uuid] = aggregate
            self.recent.pop(uuid)
            statuses = {t.status for t in aggregate.tasks.values()}
            ready = self.ready_next if aggregate.under_way else self.ready_first
            if aggregate.under_way:
                self.ready_first.pop(uuid, None)
            for index, status in ((ready, READY), (self.running, RUNNING)):
                if status in statuses:
                    index[uuid] = None
                else:
                    index.pop(uuid, None)
        elif isinstance(aggregate, WorkflowRun | WorkflowDefinition):
            for kept in (self.runs, self.ready_next, self.ready_first, self.running):
                kept.pop(aggregate.id, None)
            self.recent.put(aggregate.id, aggregate)

    def ready_runs(self) -> Iterator[WorkflowRun]:
        """The open runs with a READY task, in the order claims take them."""
        for index in (self.ready_next, self.ready_first):
            for uuid in index:
                yield self.runs[uuid]

    def claimable_count(self, ts: float, limit: int) -> int:
        """How many tasks a claim could take now (counted up to ``limit``)."""
        found = 0
        for run in self.ready_runs():
            found += len(run.claimable(ts))
            if found >= limit:
                break
        return min(found, limit)

    def begin(self, uow: UnitOfWork) -> WorkflowsWork:
        return WorkflowsWork(self, uow)


class WorkflowsWork:
    """The workflows' part of one batch."""

    def __init__(self, state: OpenRuns, uow: UnitOfWork):
        self.state = state
        self.uow = uow
        #: Runs this batch changed, in order; and those of them whose tasks a claim
        #: may take: under way, and not yet begun (see :meth:`_offered`).
        self.changed: dict[UUID, WorkflowRun] = {}
        self.next_up: dict[UUID, WorkflowRun] = {}
        self.fresh: dict[UUID, WorkflowRun] = {}

    def _run(self, uuid: UUID) -> WorkflowRun | None:
        return self.uow.get(uuid, WorkflowRun)

    def _add(self, run: WorkflowRun) -> None:
        """Store the run's new events with the batch, and offer its tasks first."""
        self.uow.add(run)
        self.changed[run.id] = run
        if not run.is_final:
            (self.next_up if run.under_way else self.fresh)[run.id] = run

    def _change(
        self, uuid: UUID, change: Callable[[WorkflowRun], Result | None], done: Result = None
    ) -> Result:
        """Apply ``change`` to the run; its answer (``done``, or :class:`Ok`, when it gives
        none). The run's refusals become the command's answer."""
        run = self._run(uuid)
        if run is None:
            return NotFoundError("workflow run not found")
        try:
            result = change(run)
        except RunNotFound as error:
            return NotFoundError(str(error))
        except RunError as error:
            return ConflictError(str(error))
        self._add(run)
        if result is not None:
            return result
        return done if done is not None else Ok()

    # ---- definitions and runs --------------------------------------------------------

    def register(self, c: RegisterWorkflow) -> Result:
        d = c.definition
        uuid = definition_uuid(d.namespace, d.name)
        workflow = self.uow.get(uuid, WorkflowDefinition)
        text = d.to_json()
        if workflow is not None and d.version in workflow.versions:
            if workflow.versions[d.version] != text:
                return ConflictError(
                    f"{d.namespace}/{d.name} version {d.version} is registered with another "
                    "definition: a registered version is immutable, register a new version"
                )
            return WorkflowRegistered(d.namespace, d.name, d.version, created=False)
        if workflow is None:
            workflow = WorkflowDefinition.create(uuid, d.namespace, d.name)
        workflow.add_version(d.version, text, self.uow.now)
        self.uow.add(workflow)
        return WorkflowRegistered(d.namespace, d.name, d.version, created=True)

    def start(self, c: StartRun) -> Result:
        uuid = run_uuid(c.namespace, c.name, c.run_id)
        if self._run(uuid) is not None:
            return RunStarted(uuid, created=False)
        workflow = self.uow.get(definition_uuid(c.namespace, c.name), WorkflowDefinition)
        definition = workflow.text() if workflow is not None else None
        if definition is None:
            return NotFoundError(f"workflow {c.namespace}/{c.name} is not registered")
        run = WorkflowRun.start(uuid, definition, c.run_id, c.input, self.uow.now)
        self._add(run)
        return RunStarted(uuid, created=True)

    def pause(self, c: PauseRun) -> Result:
        return self._change(c.instance, lambda run: run.pause(self.uow.now))

    def resume(self, c: ResumeRun) -> Result:
        return self._change(c.instance, lambda run: run.resume(self.uow.now))

    def cancel(self, c: CancelRun) -> Result:
        return self._change(c.instance, lambda run: run.cancel(self.uow.now))

    def compensate(self, c: CompensateRun) -> Result:
        return self._change(c.instance, lambda run: run.compensate(c.from_task, self.uow.now))

    def retry(self, c: RetryWorkflowTask) -> Result:
        return self._change(c.instance, lambda run: run.retry_task(c.task, c.input, self.uow.now))

    # ---- the worker protocol ------------------------------------------------------------

    def _task(self, text: str) -> tuple[UUID, str] | None:
        try:
            return parse_workflow_task_id(text)
        except UnknownIdError:
            return None

    def complete(self, c: CompleteWorkflowTask) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        uuid, task = found
        return self._change(
            uuid,
            lambda run: run.complete(task, c.spot_id, c.fence, c.output, self.uow.now),
            TaskReported(),
        )

    def fail(self, c: FailWorkflowTask) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        uuid, task = found
        jitter = self.state.jitter()
        return self._change(
            uuid,
            lambda run: TaskReported(
                will_retry=run.fail(
                    task, c.spot_id, c.fence, c.error, c.retriable, jitter, self.uow.now
                )
            ),
        )

    def renew(self, c: RenewLease) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        uuid, task = found
        return self._change(
            uuid,
            lambda run: LeaseExtended(
                run.renew(task, c.spot_id, c.fence, self.state.lease_seconds, self.uow.now)
            ),
        )

    def _running(self) -> list[WorkflowRun]:
        """The open runs with a RUNNING task, in this batch's version."""
        changed = self.changed
        held = (self.state.runs[u] for u in self.state.running if u not in changed)
        return [run for run in changed.values() if not run.is_final] + list(held)

    def fire_timers(self, c: FireTimers) -> Result:
        fired: list[str] = []
        ts = self.uow.ts
        for run in self._running():
            for task, reason in run.due(ts):
                run.expire(task.id, reason, self.state.jitter(), self.uow.now)
                self._add(run)
                fired.append(workflow_task_id(run.id, task.id))
        return Reaped(tasks=fired)

    def release(self, due: HolderDue, reason: str) -> list[str]:
        """Attempts held by spots that are gone fail now (and are retried), not at lease end."""
        released: list[str] = []
        for run in self._running():
            for task in list(run.tasks.values()):
                if task.status == RUNNING and task.holder is not None and due(task.holder, 0.0):
                    run.expire(task.id, reason, self.state.jitter(), self.uow.now)
                    self._add(run)
                    released.append(workflow_task_id(run.id, task.id))
        return released

    def offer(self, holder: str, n: int) -> list[ClaimedTask]:
        """Up to ``n`` claimable tasks (see :meth:`_offered` for the order)."""
        claimed: list[ClaimedTask] = []
        ts = self.uow.ts
        for run in self._offered():
            for task in run.claimable(ts):
                fence = run.claim(task.id, holder, self.state.lease_seconds, self.uow.now)
                self.uow.add(run)
                self.changed[run.id] = run
                claimed.append(
                    ClaimedTask(workflow_task_id(run.id, task.id), _payload(run, task.id), fence)
                )
                if len(claimed) == n:
                    return claimed
        return claimed

    def _offered(self) -> Iterator[WorkflowRun]:
        """The runs whose tasks claims take, in order: runs under way before runs not yet
        begun (a run's next step is not queued behind every run started after it), and
        within each, those this batch changed first (the next step of a chain goes out
        in the batch that completed the last), then the longest ready. A run of this
        batch with nothing left to claim is dropped from its list as it is passed."""
        runs, changed = self.state.runs, self.changed
        yield from _draining(self.next_up, self.uow.ts)
        yield from (runs[u] for u in self.state.ready_next if u not in changed)
        yield from _draining(self.fresh, self.uow.ts)
        yield from (runs[u] for u in self.state.ready_first if u not in changed)

    def end_phase(self, phase: Phase) -> None:
        pass

    def commit(self) -> None:
        pass


def _draining(runs: dict[UUID, WorkflowRun], ts: float) -> Iterator[WorkflowRun]:
    """The runs of ``runs`` with a claimable task, first first; each is taken out once
    it has nothing claimable left (a claim takes every claimable task of a run it is
    handed, or stops)."""
    while runs:
        uuid = next(iter(runs))
        run = runs[uuid]
        if run.claimable(ts):
            yield run
        if not run.claimable(ts):
            runs.pop(uuid, None)


# ---- what each command may load from the store (Family.reads) ---------------------------


def start_reads(c: StartRun) -> tuple[UUID, UUID]:
    return run_uuid(c.namespace, c.name, c.run_id), definition_uuid(c.namespace, c.name)


def register_reads(c: RegisterWorkflow) -> tuple[UUID]:
    return (definition_uuid(c.definition.namespace, c.definition.name),)


def control_reads(
    c: PauseRun | ResumeRun | CancelRun | CompensateRun | RetryWorkflowTask,
) -> tuple[UUID]:
    return (c.instance,)


def report_reads(c: CompleteWorkflowTask | FailWorkflowTask | RenewLease) -> tuple[UUID, ...]:
    try:
        return (parse_workflow_task_id(c.task_id)[0],)
    except UnknownIdError:
        return ()


def _payload(run: WorkflowRun, task_id: str) -> str:
    """What the worker gets in a claimed task's ``payload`` string."""
    task = run.tasks[task_id]
    return json.dumps(
        {
            "kind": "workflow",
            "instanceId": str(run.id),
            "workflow": {
                "namespace": run.namespace,
                "name": run.name,
                "version": run.workflow_version,
                "runId": run.run_id,
            },
            "taskId": task_id,
            "attempt": task.attempts,
            "payload": run.payload(task),
            "input": run.resolved_input(task),
        },
        separators=(",", ":"),
    )
