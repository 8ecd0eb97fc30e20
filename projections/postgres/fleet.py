"""The fleet's tables: targets and contexts (seed 000's), agents, meshes and sagas.

``target_states`` and ``execution_contexts`` are seed 000's tables with its
columns, in its order, and its ``TIMESTAMP`` (without time zone) columns, which
hold UTC; a few columns of ours follow them: ``resource_limits``, the
``reservations`` the usage is summed from (a ``Released`` event names only the
agent), and the ``aggregate_id`` that the target's or context's later events
name (only its first event has the caller's id). Our own tables (``agents``,
``meshes``, ``sagas``, ``saga_steps``) use ``timestamptz`` like the rest of the
read schema.

Each event becomes statements run in event order in the projector's
transaction (like :mod:`projections.postgres.workflows`); the ``applied`` table
makes a redelivered event change nothing. Events of one aggregate come in order,
those of different aggregates in any order, so where two aggregates write one row
(a mesh's formation saga and the mesh itself) the statements give the same row
whichever is applied first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from domain.ids import agent_id, mesh_id, saga_id
from domain.sagas.definitions import MESH_FORMATION
from domain.sagas.saga import (
    ABORTED,
    COMPENSATED,
    COMPENSATING,
    COMPLETED,
    FAILED,
    RUNNING,
    SAGA_KINDS,
    STEP_COMPENSATED,
    STEP_COMPENSATING,
    SUCCEEDED,
    TIMED_OUT,
)
from projections.postgres.workflows import Statement
from projections.status import literal
from schemas.codec import EventMessage

#: A mesh whose formation saga has started and which is not formed yet, and one whose
#: saga ended (compensated or aborted) before it was formed. The mesh's own states
#: (PENDING, ACTIVE, DISSOLVED) come from its events.
FORMING, MESH_FAILED = "FORMING", "FAILED"
MESH_PENDING, MESH_ACTIVE, MESH_DISSOLVED = "PENDING", "ACTIVE", "DISSOLVED"
AGENT_ACTIVE, AGENT_TERMINATED = "ACTIVE", "TERMINATED"

DDL = """
CREATE TABLE IF NOT EXISTS {schema}.target_states (
    id varchar(64) PRIMARY KEY,
    state varchar(32) NOT NULL,
    capabilities jsonb NOT NULL,
    current_workloads int NOT NULL,
    resource_usage jsonb NOT NULL,
    last_heartbeat timestamp NOT NULL,
    last_updated timestamp NOT NULL,
    resource_limits jsonb NOT NULL,
    reservations jsonb NOT NULL DEFAULT '{{}}',
    aggregate_id uuid NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS {schema}.execution_contexts (
    id varchar(64) PRIMARY KEY,
    hierarchies jsonb NOT NULL,
    properties jsonb NOT NULL,
    created_at timestamp NOT NULL,
    updated_at timestamp NOT NULL,
    aggregate_id uuid NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS {schema}.agents (
    id text PRIMARY KEY,
    target_id text NOT NULL,
    mesh_id text,
    state text NOT NULL,
    capabilities jsonb NOT NULL,
    performance jsonb NOT NULL DEFAULT '{{}}',
    cpu_millicores bigint NOT NULL,
    memory_bytes bigint NOT NULL,
    saga_id text NOT NULL,
    spawned_at timestamptz NOT NULL,
    ended_at timestamptz,
    updated_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_target ON {schema}.agents (target_id);
CREATE INDEX IF NOT EXISTS agents_mesh ON {schema}.agents (mesh_id);
CREATE TABLE IF NOT EXISTS {schema}.meshes (
    id text PRIMARY KEY,
    state text NOT NULL,
    topology text NOT NULL,
    required_capabilities jsonb NOT NULL,
    min_members bigint NOT NULL,
    max_members bigint NOT NULL,
    members jsonb NOT NULL DEFAULT '[]',
    performance jsonb NOT NULL DEFAULT '{{}}',
    saga_id text NOT NULL,
    formed_at timestamptz,
    ended_at timestamptz,
    updated_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS meshes_state ON {schema}.meshes (state);
CREATE TABLE IF NOT EXISTS {schema}.sagas (
    id text PRIMARY KEY,
    kind text NOT NULL,
    state text NOT NULL,
    reason text,
    params jsonb NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    updated_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS sagas_started ON {schema}.sagas (started_at DESC, id DESC);
CREATE TABLE IF NOT EXISTS {schema}.saga_steps (
    saga_id text NOT NULL REFERENCES {schema}.sagas,
    name text NOT NULL,
    state text NOT NULL,
    driver text NOT NULL,
    fence bigint NOT NULL,
    started_at timestamptz NOT NULL,
    ended_at timestamptz,
    outcome jsonb,
    error text,
    compensation text NOT NULL,
    compensated_at timestamptz,
    compensation_attempts int NOT NULL DEFAULT 0,
    last_error text,
    PRIMARY KEY (saga_id, name)
);
"""

#: The kind of saga of an event type's first part (``MeshFormation`` → mesh_formation).
KIND_OF: dict[str, str] = {cls.__name__: kind for kind, cls in SAGA_KINDS.items()}


def utc(at: datetime) -> datetime:
    """``at`` as seed 000's ``TIMESTAMP`` columns hold it: UTC, without a time zone
    (never converted through the session's time zone)."""
    return at.astimezone(UTC).replace(tzinfo=None)


# ---- targets (seed 000's target_states) ------------------------------------------------
#
# Targets do not heartbeat: ``last_heartbeat`` (seed 000's column) is, like
# ``last_updated``, the time of the target's last event.


def _limits(d: dict[str, Any]) -> str:
    return json.dumps(
        {
            "cpu_millicores": d["cpu_millicores"],
            "memory_bytes": d["memory_bytes"],
            "max_workloads": d["max_workloads"],
        }
    )


def _target_registered(m: EventMessage) -> list[Statement]:
    d = m.data
    at = utc(d["at"])
    return [
        (
            "INSERT INTO {schema}.target_states (id, state, capabilities, current_workloads, "
            "resource_usage, last_heartbeat, last_updated, resource_limits, reservations, "
            "aggregate_id) VALUES (%s, %s, %s::jsonb, 0, "
            '\'{{"cpu_millicores": 0, "memory_bytes": 0}}\'::jsonb, %s, %s, %s::jsonb, '
            "'{{}}'::jsonb, %s) ON CONFLICT DO NOTHING",
            (d["target_id"], d["state"], d["capabilities"], at, at, _limits(d), m.aggregate_id),
        )
    ]


def _target_updated(m: EventMessage) -> list[Statement]:
    d = m.data
    at = utc(d["at"])
    return [
        (
            "UPDATE {schema}.target_states SET state = %s, capabilities = %s::jsonb, "
            "resource_limits = %s::jsonb, last_heartbeat = %s, last_updated = %s "
            "WHERE aggregate_id = %s",
            (d["state"], d["capabilities"], _limits(d), at, at, m.aggregate_id),
        )
    ]


#: A target's workloads and usage from its reservations (seed 000's ``current_workloads``
#: is the number of agents placed on it).
_RECOUNT = (
    "UPDATE {schema}.target_states t SET current_workloads = r.n, "
    "resource_usage = jsonb_build_object('cpu_millicores', r.cpu, 'memory_bytes', r.memory) "
    "FROM (SELECT count(e.key) AS n, "
    "coalesce(sum((e.value ->> 'cpu_millicores')::bigint), 0) AS cpu, "
    "coalesce(sum((e.value ->> 'memory_bytes')::bigint), 0) AS memory "
    "FROM {schema}.target_states s LEFT JOIN LATERAL jsonb_each(s.reservations) e ON true "
    "WHERE s.aggregate_id = %s) r WHERE t.aggregate_id = %s"
)


def _target_reserved(m: EventMessage) -> list[Statement]:
    d = m.data
    at = utc(d["at"])
    reservation = json.dumps(
        {"cpu_millicores": d["cpu_millicores"], "memory_bytes": d["memory_bytes"]}
    )
    return [
        (
            "UPDATE {schema}.target_states SET "
            "reservations = reservations || jsonb_build_object(%s::text, %s::jsonb), "
            "last_heartbeat = %s, last_updated = %s WHERE aggregate_id = %s",
            (d["agent"], reservation, at, at, m.aggregate_id),
        ),
        (_RECOUNT, (m.aggregate_id, m.aggregate_id)),
    ]


def _target_released(m: EventMessage) -> list[Statement]:
    d = m.data
    at = utc(d["at"])
    return [
        (
            "UPDATE {schema}.target_states SET reservations = reservations - %s::text, "
            "last_heartbeat = %s, last_updated = %s WHERE aggregate_id = %s",
            (d["agent"], at, at, m.aggregate_id),
        ),
        (_RECOUNT, (m.aggregate_id, m.aggregate_id)),
    ]


# ---- contexts (seed 000's execution_contexts) --------------------------------------------


def _context_created(m: EventMessage) -> list[Statement]:
    d = m.data
    at = utc(d["at"])
    return [
        (
            "INSERT INTO {schema}.execution_contexts (id, hierarchies, properties, created_at, "
            "updated_at, aggregate_id) VALUES (%s, %s::jsonb, %s::jsonb, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (
                d["context_id"],
                json.dumps(list(d["hierarchies"])),
                d["properties"],
                at,
                at,
                m.aggregate_id,
            ),
        )
    ]


def _context_modified(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        (
            "UPDATE {schema}.execution_contexts SET hierarchies = %s::jsonb, "
            "properties = %s::jsonb, updated_at = %s WHERE aggregate_id = %s",
            (json.dumps(list(d["hierarchies"])), d["properties"], utc(d["at"]), m.aggregate_id),
        )
    ]


# ---- agents -------------------------------------------------------------------------------


def _agent_spawned(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        (
            "INSERT INTO {schema}.agents (id, target_id, mesh_id, state, capabilities, "
            "performance, cpu_millicores, memory_bytes, saga_id, spawned_at, updated_at) "
            f"VALUES (%s, %s, NULL, {literal(AGENT_ACTIVE)}, %s::jsonb, '{{{{}}}}'::jsonb, "
            "%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                agent_id(m.aggregate_id),
                d["target_id"],
                d["capabilities"],
                d["cpu_millicores"],
                d["memory_bytes"],
                d["saga"],
                d["at"],
                d["at"],
            ),
        )
    ]


def _agent_set(assignments: str, *values: Any) -> Callable[[EventMessage], list[Statement]]:
    """An event that sets ``assignments`` (``%s`` for ``values``' fields of the event)."""

    def statements(m: EventMessage) -> list[Statement]:
        d = m.data
        return [
            (
                f"UPDATE {{schema}}.agents SET {assignments}, updated_at = %s WHERE id = %s",
                (*(d[v] for v in values), d["at"], agent_id(m.aggregate_id)),
            )
        ]

    return statements


# ---- meshes -------------------------------------------------------------------------------


def _mesh_formed(m: EventMessage) -> list[Statement]:
    """The mesh itself: what its saga's start wrote is replaced (whichever came first)."""
    d = m.data
    state = MESH_ACTIVE if d["min_members"] <= 0 else MESH_PENDING
    return [
        (
            "INSERT INTO {schema}.meshes (id, state, topology, required_capabilities, "
            "min_members, max_members, members, performance, saga_id, formed_at, updated_at) "
            "VALUES (%s, %s, %s, %s::jsonb, %s, %s, '[]'::jsonb, '{{}}'::jsonb, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET state = EXCLUDED.state, "
            "topology = EXCLUDED.topology, "
            "required_capabilities = EXCLUDED.required_capabilities, "
            "min_members = EXCLUDED.min_members, max_members = EXCLUDED.max_members, "
            "saga_id = EXCLUDED.saga_id, formed_at = EXCLUDED.formed_at, ended_at = NULL, "
            "updated_at = EXCLUDED.updated_at",
            (
                mesh_id(m.aggregate_id),
                state,
                d["topology"],
                d["required_capabilities"],
                d["min_members"],
                d["max_members"],
                d["saga"],
                d["at"],
                d["at"],
            ),
        )
    ]


def _topology_changed(m: EventMessage) -> list[Statement]:
    d = m.data
    joined, left = list(d["joined"]), list(d["left"])
    return [
        (
            # jsonb - text[] takes those strings out of the array; applied once per
            # version (the projector's tracking), so joined ids are appended once.
            "UPDATE {schema}.meshes SET members = (members - %s::text[] - %s::text[]) || %s::jsonb, "
            f"state = CASE WHEN state = {literal(MESH_DISSOLVED)} THEN state "
            f"WHEN %s >= min_members THEN {literal(MESH_ACTIVE)} "
            f"ELSE {literal(MESH_PENDING)} END, updated_at = %s WHERE id = %s",
            (left, joined, json.dumps(joined), d["size"], d["at"], mesh_id(m.aggregate_id)),
        )
    ]


def _mesh_improved(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        (
            "UPDATE {schema}.meshes SET performance = performance || %s::jsonb, "
            "updated_at = %s WHERE id = %s",
            (d["metrics"], d["at"], mesh_id(m.aggregate_id)),
        )
    ]


def _mesh_dissolved(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        (
            f"UPDATE {{schema}}.meshes SET state = {literal(MESH_DISSOLVED)}, "
            "members = '[]'::jsonb, ended_at = %s, updated_at = %s WHERE id = %s",
            (d["at"], d["at"], mesh_id(m.aggregate_id)),
        )
    ]


# ---- sagas and their steps (mirroring domain/sagas/saga.py) ----------------------------


def _kind(m: EventMessage) -> str:
    return KIND_OF[m.aggregate_type]


def _saga_started(m: EventMessage) -> list[Statement]:
    d, saga, kind = m.data, saga_id(m.aggregate_id), _kind(m)
    out: list[Statement] = [
        (
            "INSERT INTO {schema}.sagas (id, kind, state, params, started_at, updated_at) "
            f"VALUES (%s, %s, {literal(RUNNING)}, %s::jsonb, %s, %s) ON CONFLICT DO NOTHING",
            (saga, kind, d["params"], d["at"], d["at"]),
        )
    ]
    if kind == MESH_FORMATION:
        # The mesh is FORMING from its saga's start; Mesh.Formed replaces the row.
        p = json.loads(d["params"])
        out.append(
            (
                "INSERT INTO {schema}.meshes (id, state, topology, required_capabilities, "
                "min_members, max_members, saga_id, updated_at) "
                f"VALUES (%s, {literal(FORMING)}, %s, %s::jsonb, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (
                    p["meshId"],
                    p["topology"],
                    json.dumps(p["requiredCapabilities"]),
                    p["minMembers"],
                    p["maxMembers"],
                    saga,
                    d["at"],
                ),
            )
        )
    return out


def _touch(m: EventMessage, assignments: str = "", *values: Any) -> Statement:
    """The saga's row: ``assignments`` (with ``values``) and its ``updated_at``."""
    sets = f"{assignments}, " if assignments else ""
    return (
        f"UPDATE {{schema}}.sagas SET {sets}updated_at = %s WHERE id = %s",
        (*values, m.data["at"], saga_id(m.aggregate_id)),
    )


def _step(m: EventMessage, assignments: str, *values: Any) -> Statement:
    return (
        f"UPDATE {{schema}}.saga_steps SET {assignments} WHERE saga_id = %s AND name = %s",
        (*values, saga_id(m.aggregate_id), m.data["step"]),
    )


def _step_started(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        (
            "INSERT INTO {schema}.saga_steps (saga_id, name, state, driver, fence, started_at, "
            f"compensation) VALUES (%s, %s, {literal(RUNNING)}, %s, %s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            (
                saga_id(m.aggregate_id),
                d["step"],
                d["driver"],
                d["fence"],
                d["at"],
                d["compensation"],
            ),
        ),
        _touch(m),
    ]


def _step_succeeded(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        _step(
            m, "state = %s, ended_at = %s, outcome = %s::jsonb", SUCCEEDED, d["at"], d["outcome"]
        ),
        _touch(m),
    ]


def _step_failed(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        _step(m, "state = %s, ended_at = %s, error = %s", FAILED, d["at"], d["error"]),
        _touch(m),
    ]


def _step_timed_out(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        _step(
            m,
            "state = %s, ended_at = %s, error = %s",
            TIMED_OUT,
            d["at"],
            "timed out: did not finish in time",
        ),
        _touch(m),
    ]


def _compensation_started(m: EventMessage) -> list[Statement]:
    return [_touch(m, "state = %s, reason = %s", COMPENSATING, m.data["reason"])]


def _compensation_taken(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        _step(m, "state = %s, driver = %s, fence = %s", STEP_COMPENSATING, d["driver"], d["fence"]),
        _touch(m),
    ]


def _step_compensated(m: EventMessage) -> list[Statement]:
    return [_step(m, "state = %s, compensated_at = %s", STEP_COMPENSATED, m.data["at"]), _touch(m)]


def _compensation_failed(m: EventMessage) -> list[Statement]:
    """The step is back to what it was before its compensation was taken: TIMED_OUT
    if it timed out (it has an error), else SUCCEEDED."""
    return [
        _step(
            m,
            f"state = CASE WHEN error IS NULL THEN {literal(SUCCEEDED)} "
            f"ELSE {literal(TIMED_OUT)} END, "
            "compensation_attempts = compensation_attempts + 1, last_error = %s",
            m.data["error"],
        ),
        _touch(m),
    ]


def _completed(m: EventMessage) -> list[Statement]:
    return [_touch(m, "state = %s, ended_at = %s", COMPLETED, m.data["at"])]


def _mesh_failed(m: EventMessage) -> list[Statement]:
    """A formation saga that ended before its mesh was formed: the mesh FAILED (a mesh
    that was formed keeps what its own events say)."""
    if _kind(m) != MESH_FORMATION:
        return []
    return [
        (
            f"UPDATE {{schema}}.meshes SET state = {literal(MESH_FAILED)}, ended_at = %s, "
            "updated_at = %s WHERE id = (SELECT params ->> 'meshId' FROM {schema}.sagas "
            "WHERE id = %s) AND formed_at IS NULL",
            (m.data["at"], m.data["at"], saga_id(m.aggregate_id)),
        )
    ]


def _compensated(m: EventMessage) -> list[Statement]:
    return [_touch(m, "state = %s, ended_at = %s", COMPENSATED, m.data["at"]), *_mesh_failed(m)]


def _aborted(m: EventMessage) -> list[Statement]:
    d = m.data
    return [
        _touch(m, "state = %s, reason = %s, ended_at = %s", ABORTED, d["reason"], d["at"]),
        *_mesh_failed(m),
    ]


_SAGA_HANDLERS: dict[str, Callable[[EventMessage], list[Statement]]] = {
    "Started": _saga_started,
    "StepStarted": _step_started,
    "StepSucceeded": _step_succeeded,
    "StepFailed": _step_failed,
    "StepTimedOut": _step_timed_out,
    "CompensationStarted": _compensation_started,
    "CompensationTaken": _compensation_taken,
    "StepCompensated": _step_compensated,
    "CompensationFailed": _compensation_failed,
    "Completed": _completed,
    "Compensated": _compensated,
    "Aborted": _aborted,
}

#: What each fleet event type does to the tables.
HANDLERS: dict[str, Callable[[EventMessage], list[Statement]]] = {
    "Target.Registered": _target_registered,
    "Target.Updated": _target_updated,
    "Target.Reserved": _target_reserved,
    "Target.Released": _target_released,
    "Context.Created": _context_created,
    "Context.Modified": _context_modified,
    "Agent.Spawned": _agent_spawned,
    "Agent.PerformanceUpdated": _agent_set("performance = performance || %s::jsonb", "metrics"),
    "Agent.CapabilityEvolved": _agent_set("capabilities = %s::jsonb", "capabilities"),
    "Agent.MeshJoined": _agent_set("mesh_id = %s", "mesh"),
    "Agent.MeshLeft": _agent_set("mesh_id = NULL"),
    "Agent.Terminated": _agent_set(f"state = {literal(AGENT_TERMINATED)}, ended_at = %s", "at"),
    "Mesh.Formed": _mesh_formed,
    "Mesh.TopologyChanged": _topology_changed,
    "Mesh.PerformanceImproved": _mesh_improved,
    "Mesh.Dissolved": _mesh_dissolved,
    **{
        f"{prefix}.{name}": handler
        for prefix in KIND_OF
        for name, handler in _SAGA_HANDLERS.items()
    },
}

#: Every fleet event is shown.
#: Seed 001's system events: the audit API and the topic's subscribers show them.
NOT_SHOWN: frozenset[str] = frozenset(
    {
        "System.Started",
        "System.ConfigurationChanged",
        "System.OptimizationCycleCompleted",
        "System.EmergencyStateActivated",
        "System.RecoveryProcessInitiated",
    }
)

#: The tables and their keys, for :meth:`PostgresReadModel.dump`.
TABLES: tuple[tuple[str, str], ...] = (
    ("target_states", "id"),
    ("execution_contexts", "id"),
    ("agents", "id"),
    ("meshes", "id"),
    ("sagas", "id"),
    ("saga_steps", "saga_id, name"),
)
