"""Audit views of a workflow run and of one workflow task."""

from __future__ import annotations

from domain.audit import EventSource, History, fields, record
from domain.workflows.ids import parse_instance_id, parse_workflow_task_id
from domain.workflows.run import WorkflowRun


def run_history(entity_id: str, source: EventSource) -> History | None:
    events = list(source.stored_events(parse_instance_id(entity_id)))
    if not events or not isinstance(events[0], WorkflowRun.Started):
        return None
    return [record(e, fields(e)) for e in events]


def workflow_task_history(entity_id: str, source: EventSource) -> History | None:
    run, task = parse_workflow_task_id(entity_id)
    events = list(source.stored_events(run))
    if not events or not isinstance(events[0], WorkflowRun.Started):
        return None
    mine = [e for e in events if getattr(e, "task", None) == task]
    return [record(e, fields(e)) for e in mine]
