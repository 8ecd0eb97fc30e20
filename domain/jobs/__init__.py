"""Jobs: parameter sweeps whose tasks live in task blocks, claimed by spots.

Open work: the task blocks with unfinished tasks (and, in memory, their jobs).
"""

from __future__ import annotations

from domain.audit import whole
from domain.family import Family, Phase, Reaped
from domain.ids import parse_job_id
from domain.jobs.audit import task_history
from domain.jobs.commands import (
    CompleteTask,
    CreateJob,
    FailTask,
    Finished,
    JobCreated,
    ReapTasks,
    ReleaseClaims,
)
from domain.jobs.job import Job
from domain.jobs.state import BLOCK_SIZE, JobsWork, OpenJobs
from domain.jobs.tasks import TaskBlock

FAMILY = Family(
    name="jobs",
    events=(
        Job.Created,
        TaskBlock.Created,
        TaskBlock.Claimed,
        TaskBlock.Completed,
        TaskBlock.Failed,
        TaskBlock.Reaped,
    ),
    topic="workload",
    handlers={
        CreateJob: JobsWork.create_job,
        CompleteTask: JobsWork.complete,
        FailTask: JobsWork.fail,
        ReapTasks: JobsWork.reap_tasks,
        ReleaseClaims: JobsWork.release_claims,
    },
    phases={
        CompleteTask: Phase.FINISH,
        FailTask: Phase.FINISH,
        ReapTasks: Phase.FINISH,
        ReleaseClaims: Phase.FINISH,
    },
    results=(JobCreated, Finished, Reaped),
    state=OpenJobs,
    open_when={TaskBlock: lambda block: not block.is_finished()},
    audit={"job": whole(parse_job_id, Job), "task": task_history},
    release=JobsWork.release,
    offer=JobsWork.offer,
    claimable=OpenJobs.claimable_count,
    legacy_topics={"domain.jobs:Job": Job, "domain.tasks:TaskBlock": TaskBlock},
)

__all__ = [
    "BLOCK_SIZE",
    "FAMILY",
    "CompleteTask",
    "CreateJob",
    "FailTask",
    "Finished",
    "Job",
    "JobCreated",
    "OpenJobs",
    "ReapTasks",
    "ReleaseClaims",
    "TaskBlock",
]
