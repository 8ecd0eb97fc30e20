"""Seed 002's tables, projected from the workflows family's events.

``workflow_instances`` (with its sequence number: the run's version),
``task_executions`` (one row per attempt of a task), ``execution_leases`` (one
row per task: its current holder, expiry and fence) and ``events`` (one row per
run event), plus ``workflow_definitions``. Each event becomes statements run in
event order inside the projector's transaction (the ``events`` rows and the
sequence numbers of a batch gathered into one statement each: :func:`in_bulk`);
the ``applied`` table makes a redelivered event change nothing. A lease holder is a spot id (text), not the
seed's UUID: Tadpole's workers are spots.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from domain.workflows.run import RUN_FINAL
from schemas.codec import EventMessage

DDL = """
CREATE TABLE IF NOT EXISTS {schema}.workflow_definitions (
    namespace varchar(255) NOT NULL,
    workflow_name varchar(255) NOT NULL,
    version varchar(255) NOT NULL,
    definition text NOT NULL,
    registered_at timestamptz NOT NULL,
    PRIMARY KEY (namespace, workflow_name, version)
);
CREATE TABLE IF NOT EXISTS {schema}.workflow_instances (
    instance_id uuid PRIMARY KEY,
    namespace varchar(255) NOT NULL,
    workflow_name varchar(255) NOT NULL,
    workflow_version varchar(255) NOT NULL,
    run_id varchar(512) NOT NULL,
    state varchar(50) NOT NULL,
    sequence_number bigint NOT NULL DEFAULT 0,
    input text NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    CONSTRAINT uk_idempotency UNIQUE (namespace, workflow_name, run_id)
);
CREATE TABLE IF NOT EXISTS {schema}.task_executions (
    execution_id uuid PRIMARY KEY,
    workflow_instance_id uuid NOT NULL REFERENCES {schema}.workflow_instances,
    task_id varchar(255) NOT NULL,
    idempotency_key varchar(512) NOT NULL UNIQUE,
    attempt_number integer NOT NULL DEFAULT 1,
    state varchar(50) NOT NULL,
    lease_holder text,
    lease_expires_at timestamptz,
    fence_token bigint NOT NULL DEFAULT 0,
    output text,
    error text,
    started_at timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS task_executions_instance
    ON {schema}.task_executions (workflow_instance_id, task_id);
CREATE TABLE IF NOT EXISTS {schema}.execution_leases (
    lease_key varchar(512) PRIMARY KEY,
    holder_id text,
    expires_at timestamptz,
    fence_token bigint NOT NULL DEFAULT 1
);
CREATE TABLE IF NOT EXISTS {schema}.events (
    event_id uuid PRIMARY KEY,
    workflow_instance_id uuid NOT NULL REFERENCES {schema}.workflow_instances,
    sequence_number bigint NOT NULL,
    event_type varchar(50) NOT NULL,
    idempotency_key varchar(512) NOT NULL UNIQUE,
    occurred_at timestamptz NOT NULL
);
"""

_EVENTS = uuid5(NAMESPACE_URL, "https://tadpole.dev/read/workflow-events")

Statement = tuple[str, tuple[Any, ...]]


def _execution(run: UUID, task: str, attempt: int) -> UUID:
    return uuid5(run, f"execution:{task}#{attempt}")


def _lease(run: UUID, task: str) -> str:
    return f"{run}:{task}"


def _version_registered(m: EventMessage) -> list[Statement]:
    d = m.data
    definition = json.loads(d["definition"])
    return [
        (
            "INSERT INTO {schema}.workflow_definitions VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (
                definition["namespace"],
                definition["name"],
                d["workflow_version"],
                d["definition"],
                d["at"],
            ),
        )
    ]


#: Stand-ins for statements that :func:`in_bulk` gathers into one per batch: a row of
#: ``events``, and an instance's sequence number.
EVENT_ROW = "-- an events row"
SEQUENCE = "-- a sequence number"


def _run_event(m: EventMessage) -> list[Statement]:
    """Every run event: a row in ``events``, and the instance's sequence number."""
    run = m.aggregate_id
    row = (uuid5(_EVENTS, f"{run}:{m.version}"), run, m.version, m.type, f"{run}:{m.version}")
    return [(EVENT_ROW, (*row, m.timestamp)), (SEQUENCE, (run, m.version))]


def in_bulk(statements: list[Statement]) -> list[Statement]:
    """A batch's statements in event order, but every ``events`` row in one INSERT and
    every instance's sequence number in one UPDATE, after the rest (the rows they
    refer to are inserted by then; neither is read by another statement)."""
    kept: list[Statement] = []
    rows: list[tuple[Any, ...]] = []
    sequence: dict[UUID, int] = {}
    for statement in statements:
        if statement[0] is EVENT_ROW:
            rows.append(statement[1])
        elif statement[0] is SEQUENCE:
            run, version = statement[1]
            sequence[run] = max(version, sequence.get(run, 0))
        else:
            kept.append(statement)
    if rows:
        kept.append(
            (
                "INSERT INTO {schema}.events SELECT * FROM unnest(%s::uuid[], %s::uuid[], "
                "%s::bigint[], %s::text[], %s::text[], %s::timestamptz[]) ON CONFLICT DO NOTHING",
                tuple(list(column) for column in zip(*rows, strict=True)),
            )
        )
    if sequence:
        kept.append(
            (
                "UPDATE {schema}.workflow_instances AS i SET sequence_number = s.version "
                "FROM unnest(%s::uuid[], %s::bigint[]) AS s(id, version) "
                "WHERE i.instance_id = s.id AND i.sequence_number < s.version",
                (list(sequence), list(sequence.values())),
            )
        )
    return kept


def _started(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        (
            "INSERT INTO {schema}.workflow_instances (instance_id, namespace, workflow_name, "
            "workflow_version, run_id, state, sequence_number, input, started_at) "
            "VALUES (%s, %s, %s, %s, %s, 'RUNNING', %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                m.aggregate_id,
                d["namespace"],
                d["name"],
                d["workflow_version"],
                d["run_id"],
                m.version,
                d["input"],
                d["at"],
            ),
        ),
        *_run_event(m),
    ]


def _claimed(m: EventMessage) -> list[Statement]:
    d, run = m.data, m.aggregate_id
    return [
        (
            "INSERT INTO {schema}.task_executions (execution_id, workflow_instance_id, task_id, "
            "idempotency_key, attempt_number, state, lease_holder, lease_expires_at, "
            "fence_token, started_at) VALUES (%s, %s, %s, %s, %s, 'RUNNING', %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (
                _execution(run, d["task"], d["attempt"]),
                run,
                d["task"],
                f"{run}:{d['task']}:{d['attempt']}",
                d["attempt"],
                d["holder"],
                d["lease_expires"],
                d["fence"],
                d["at"],
            ),
        ),
        (
            "INSERT INTO {schema}.execution_leases VALUES (%s, %s, %s, %s) ON CONFLICT "
            "(lease_key) DO UPDATE SET holder_id = EXCLUDED.holder_id, "
            "expires_at = EXCLUDED.expires_at, fence_token = EXCLUDED.fence_token",
            (_lease(run, d["task"]), d["holder"], d["lease_expires"], d["fence"]),
        ),
        *_run_event(m),
    ]


def _renewed(m: EventMessage) -> list[Statement]:
    d, run = m.data, m.aggregate_id
    return [
        (
            "UPDATE {schema}.task_executions SET lease_expires_at = %s "
            "WHERE workflow_instance_id = %s AND task_id = %s AND fence_token = %s",
            (d["lease_expires"], run, d["task"], d["fence"]),
        ),
        (
            "UPDATE {schema}.execution_leases SET expires_at = %s "
            "WHERE lease_key = %s AND fence_token = %s",
            (d["lease_expires"], _lease(run, d["task"]), d["fence"]),
        ),
        *_run_event(m),
    ]


def _ended(state: str, output: str | None, error: str | None, m: EventMessage) -> list[Statement]:
    d, run = m.data, m.aggregate_id
    return [
        (
            "UPDATE {schema}.task_executions SET state = %s, output = %s, error = %s, "
            "finished_at = %s, lease_holder = NULL, lease_expires_at = NULL "
            "WHERE workflow_instance_id = %s AND task_id = %s AND fence_token = %s",
            (state, output, error, d["at"], run, d["task"], d["fence"]),
        ),
        (
            "UPDATE {schema}.execution_leases SET holder_id = NULL, expires_at = NULL "
            "WHERE lease_key = %s AND fence_token = %s",
            (_lease(run, d["task"]), d["fence"]),
        ),
        *_run_event(m),
    ]


def _completed(m: EventMessage) -> list[Statement]:
    return _ended("COMPLETED", m.data["output"], None, m)


def _attempt_failed(m: EventMessage) -> list[Statement]:
    return _ended("FAILED", None, m.data["error"], m)


def _cancelled(m: EventMessage) -> list[Statement]:
    run = m.aggregate_id
    return [
        (
            "UPDATE {schema}.task_executions SET state = 'CANCELLED', finished_at = %s, "
            "lease_holder = NULL, lease_expires_at = NULL "
            "WHERE workflow_instance_id = %s AND state = 'RUNNING'",
            (m.data["at"], run),
        ),
        (
            "UPDATE {schema}.execution_leases SET holder_id = NULL, expires_at = NULL "
            "WHERE lease_key LIKE %s",
            (f"{run}:%",),
        ),
        *_run_event(m),
    ]


def _state_changed(m: EventMessage) -> list[Statement]:
    d = m.data
    ended = d["at"] if d["state"] in RUN_FINAL else None
    return [
        (
            "UPDATE {schema}.workflow_instances SET state = %s, ended_at = %s "
            "WHERE instance_id = %s",
            (d["state"], ended, m.aggregate_id),
        ),
        *_run_event(m),
    ]


#: What each workflow event type does to seed 002's tables.
HANDLERS: dict[str, Callable[[EventMessage], list[Statement]]] = {
    "WorkflowDefinition.VersionRegistered": _version_registered,
    "WorkflowRun.Started": _started,
    "WorkflowRun.TaskClaimed": _claimed,
    "WorkflowRun.LeaseRenewed": _renewed,
    "WorkflowRun.TaskCompleted": _completed,
    "WorkflowRun.AttemptFailed": _attempt_failed,
    "WorkflowRun.Paused": _run_event,
    "WorkflowRun.Resumed": _run_event,
    "WorkflowRun.Cancelled": _cancelled,
    "WorkflowRun.CompensationStarted": _run_event,
    "WorkflowRun.TaskRetried": _run_event,
    "WorkflowRun.StateChanged": _state_changed,
}

#: Shown nowhere here: a workflow's first event says no more than its first version.
NOT_SHOWN = frozenset({"WorkflowDefinition.Registered"})
