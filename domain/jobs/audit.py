"""The audit view of one task: the events of its block that name it, narrowed to its part."""

from __future__ import annotations

from typing import Any

from domain.audit import EventSource, History, fields, record
from domain.ids import parse_task_id
from domain.jobs.job import Job

_PER_TASK = {
    "holders": "holder",
    "fences": "fenceToken",
    "attempts": "attempt",
    "runtime_ms": "runtimeMs",
    "iters": "iter",
    "fopts": "fopt",
    "results": "resultJson",
    "errors": "error",
    "retried": "retried",
}


def task_history(entity_id: str, source: EventSource) -> History | None:
    ref = parse_task_id(entity_id)
    job = source.load(ref.job)
    if not isinstance(job, Job) or ref.index >= job.total_tasks:
        return None
    history = []
    for event in source.stored_events(job.block_of(ref.index)):
        data = fields(event)
        if "indexes" not in data:
            history.append(record(event, {"job_id": data.get("job_id")}))
            continue
        if ref.index not in data["indexes"]:
            continue
        at = data["indexes"].index(ref.index)
        mine: dict[str, Any] = {"job_id": data["job_id"], "at": data["at"]}
        for name, label in _PER_TASK.items():
            if name in data:
                mine[label] = data[name][at]
        if "reason" in data:
            mine["reason"] = data["reason"]
        history.append(record(event, mine))
    return history
