"""Audit: an entity's whole history, read from the event store itself.

A task's history is the events of its block that name it, narrowed to its own
part of each (its holder, fence, result...), so an auditor sees that task alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from domain.ids import UnknownIdError, parse_job_id, parse_spot_id, parse_task_id
from domain.jobs import Job

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


class EventSource(Protocol):
    def stored_events(self, uuid: UUID) -> Iterable[Any]: ...

    def load(self, uuid: UUID) -> Any: ...


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def _record(event: Any, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": type(event).__qualname__,
        "version": event.originator_version,
        "timestamp": event.timestamp.isoformat(),
        "data": {k: _plain(v) for k, v in data.items()},
    }


def _fields(event: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in vars(event).items()
        if k not in ("originator_id", "originator_version", "timestamp", "originator_topic")
    }


class AuditLog:
    def __init__(self, source: EventSource):
        self.source = source

    def history(self, aggregate: str, entity_id: str) -> list[dict[str, Any]] | None:
        """Every event of the entity in order, or None if there is no such entity."""
        try:
            if aggregate == "job":
                return self._whole(parse_job_id(entity_id), "Job.Created")
            if aggregate == "spot":
                return self._whole(parse_spot_id(entity_id), "Spot.Registered")
            if aggregate == "task":
                return self._task(entity_id)
        except UnknownIdError:
            return None
        return None

    def _whole(self, uuid: UUID, created: str) -> list[dict[str, Any]] | None:
        """The aggregate's events, if it is of the kind whose first event is ``created``."""
        events = [_record(e, _fields(e)) for e in self.source.stored_events(uuid)]
        if not events or events[0]["type"] != created:
            return None
        return events

    def _task(self, entity_id: str) -> list[dict[str, Any]] | None:
        ref = parse_task_id(entity_id)
        job = self.source.load(ref.job)
        if not isinstance(job, Job) or ref.index >= job.total_tasks:
            return None
        history = []
        for event in self.source.stored_events(job.block_of(ref.index)):
            data = _fields(event)
            if "indexes" not in data:
                history.append(_record(event, {"job_id": data.get("job_id")}))
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
            history.append(_record(event, mine))
        return history
