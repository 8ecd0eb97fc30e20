"""Workflows (seed 002): definitions, idempotent runs, leased tasks, timers, compensation.

Open work: the runs that are not final.
"""

from __future__ import annotations

from domain.family import Family, Ok, Phase, Reaped
from domain.workflows.audit import run_history, workflow_task_history
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
from domain.workflows.definitions import Definition, DefinitionError
from domain.workflows.run import TaskStateAsDict, WorkflowRun
from domain.workflows.state import (
    OpenRuns,
    WorkflowsWork,
    control_reads,
    register_reads,
    report_reads,
    start_reads,
)

FAMILY = Family(
    name="workflows",
    events=(
        WorkflowDefinition.Registered,
        WorkflowDefinition.VersionRegistered,
        WorkflowRun.Started,
        WorkflowRun.TaskClaimed,
        WorkflowRun.LeaseRenewed,
        WorkflowRun.TaskCompleted,
        WorkflowRun.AttemptFailed,
        WorkflowRun.Paused,
        WorkflowRun.Resumed,
        WorkflowRun.Cancelled,
        WorkflowRun.CompensationStarted,
        WorkflowRun.TaskRetried,
        WorkflowRun.StateChanged,
    ),
    topic="workload",
    handlers={
        RegisterWorkflow: WorkflowsWork.register,
        StartRun: WorkflowsWork.start,
        PauseRun: WorkflowsWork.pause,
        ResumeRun: WorkflowsWork.resume,
        CancelRun: WorkflowsWork.cancel,
        CompensateRun: WorkflowsWork.compensate,
        RetryWorkflowTask: WorkflowsWork.retry,
        CompleteWorkflowTask: WorkflowsWork.complete,
        FailWorkflowTask: WorkflowsWork.fail,
        RenewLease: WorkflowsWork.renew,
        FireTimers: WorkflowsWork.fire_timers,
    },
    phases={
        CompleteWorkflowTask: Phase.FINISH,
        FailWorkflowTask: Phase.FINISH,
        RenewLease: Phase.FINISH,
        FireTimers: Phase.FINISH,
    },
    results=(WorkflowRegistered, RunStarted, TaskReported, LeaseExtended, Reaped, Ok),
    state=OpenRuns,
    open_when={WorkflowRun: lambda run: not run.is_final},
    audit={"workflow-run": run_history, "workflow-task": workflow_task_history},
    release=WorkflowsWork.release,
    offer=WorkflowsWork.offer,
    claimable=OpenRuns.claimable_count,
    reads={
        StartRun: start_reads,
        RegisterWorkflow: register_reads,
        **dict.fromkeys(
            (PauseRun, ResumeRun, CancelRun, CompensateRun, RetryWorkflowTask), control_reads
        ),
        **dict.fromkeys((CompleteWorkflowTask, FailWorkflowTask, RenewLease), report_reads),
    },
    transcodings=(TaskStateAsDict(),),
)

__all__ = [
    "FAMILY",
    "CancelRun",
    "CompensateRun",
    "CompleteWorkflowTask",
    "Definition",
    "DefinitionError",
    "FailWorkflowTask",
    "FireTimers",
    "LeaseExtended",
    "OpenRuns",
    "PauseRun",
    "RegisterWorkflow",
    "RenewLease",
    "ResumeRun",
    "RetryWorkflowTask",
    "RunStarted",
    "StartRun",
    "TaskReported",
    "WorkflowDefinition",
    "WorkflowRegistered",
    "WorkflowRun",
]
