"""PostgreSQL read models: jobs, tasks with their results, spots (seed 003's tables).

Every change records the version it applied per aggregate in ``applied`` in the
same transaction, so a redelivered event changes nothing and a gap (a version
skipped) is seen and healed from the event store.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from domain.ids import spot_id, task_id
from domain.sweeps import Sweep
from schemas.codec import EventMessage

DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.jobs (
    id text PRIMARY KEY,
    status text NOT NULL,
    total_tasks integer NOT NULL,
    completed_tasks integer NOT NULL DEFAULT 0,
    failed_tasks integer NOT NULL DEFAULT 0,
    jar_path text NOT NULL,
    main_class text NOT NULL,
    created_at timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS {schema}.tasks (
    id text PRIMARY KEY,
    job_id text NOT NULL,
    idx integer NOT NULL,
    status text NOT NULL,
    algorithm text NOT NULL,
    iterations integer NOT NULL,
    agents integer NOT NULL,
    dimension integer NOT NULL,
    assigned_to text,
    attempts integer NOT NULL DEFAULT 0,
    fence_token bigint NOT NULL DEFAULT 0,
    started_at timestamptz,
    finished_at timestamptz,
    runtime_ms bigint,
    iter bigint,
    fopt double precision,
    result_json text,
    error text
);
CREATE INDEX IF NOT EXISTS tasks_job_status ON {schema}.tasks (job_id, status, idx);
CREATE TABLE IF NOT EXISTS {schema}.spots (
    id text PRIMARY KEY,
    ip_address text NOT NULL,
    status text NOT NULL,
    cpu_load double precision NOT NULL DEFAULT 0,
    running_tasks integer NOT NULL DEFAULT 0,
    total_cores integer NOT NULL DEFAULT 0,
    registered_at timestamptz NOT NULL,
    last_heartbeat timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.applied (
    aggregate_id uuid PRIMARY KEY,
    version bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS {schema}.checkpoint (
    name text PRIMARY KEY,
    position bigint NOT NULL
);
"""

TABLES = ("jobs", "tasks", "spots", "applied", "checkpoint")


class PostgresReadModel:
    """Applies events to the tables in ``schema`` (sync psycopg; one projector process)."""

    name = "postgres"

    def __init__(self, conninfo: str, schema: str):
        self.schema = schema
        self.conn = psycopg.connect(conninfo, autocommit=False)
        self._s = sql.Identifier(schema)

    def close(self) -> None:
        self.conn.close()

    def q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self._s)

    def create(self) -> None:
        with self.conn.transaction():
            self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x7AD9002,))
            self.conn.execute(self.q(DDL))

    def reset(self) -> None:
        with self.conn.transaction():
            self.conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(self._s))
        self.create()

    # ---- tracking -----------------------------------------------------------------

    def checkpoint(self) -> int:
        with self.conn.transaction():
            row = self.conn.execute(
                self.q("SELECT position FROM {schema}.checkpoint WHERE name = 'store'")
            ).fetchone()
        return int(row[0]) if row else 0

    def set_checkpoint(self, position: int) -> None:
        with self.conn.transaction():
            self.conn.execute(
                self.q(
                    "INSERT INTO {schema}.checkpoint VALUES ('store', %s) "
                    "ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position"
                ),
                (position,),
            )

    def lost(self) -> bool:
        """PostgreSQL keeps its tables: nothing to detect beyond gaps."""
        return False

    def apply(self, messages: Sequence[EventMessage]) -> list[EventMessage]:
        """Apply in order what is next for its aggregate; return the messages after a gap.

        One transaction for the whole batch: the effects and the versions they
        bring the ``applied`` table to.
        """
        gaps: list[EventMessage] = []
        with self.conn.transaction(), self.conn.cursor() as cur:
            ids = list({m.aggregate_id for m in messages})
            cur.execute(
                self.q(
                    "SELECT aggregate_id, version FROM {schema}.applied "
                    "WHERE aggregate_id = ANY(%s) FOR UPDATE"
                ),
                (ids,),
            )
            versions: dict[UUID, int] = {row[0]: row[1] for row in cur.fetchall()}
            for m in messages:
                current = versions.get(m.aggregate_id, 0)
                if m.version <= current:
                    continue
                if m.version > current + 1:
                    gaps.append(m)
                    continue
                self._handle(cur, m)
                versions[m.aggregate_id] = m.version
            cur.executemany(
                self.q(
                    "INSERT INTO {schema}.applied VALUES (%s, %s) ON CONFLICT (aggregate_id) "
                    "DO UPDATE SET version = EXCLUDED.version "
                    "WHERE {schema}.applied.version < EXCLUDED.version"
                ),
                list(versions.items()),
            )
        return gaps

    # ---- handlers -------------------------------------------------------------------

    def _handle(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        handler = getattr(self, "_on_" + m.type.replace(".", "_"), None)
        if handler is not None:
            handler(cur, m)

    def _on_Job_Created(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        sweep = Sweep.from_json(m.data["sweep"])
        cur.execute(
            self.q(
                "INSERT INTO {schema}.jobs (id, status, total_tasks, jar_path, main_class, "
                "created_at) VALUES (%s, 'RUNNING', %s, %s, %s, %s) ON CONFLICT DO NOTHING"
            ),
            ("job-" + m.aggregate_id.hex, m.data["total_tasks"], sweep.jar_path,
             sweep.main_class, m.timestamp),
        )

    def _on_TaskBlock_Created(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        d = m.data
        sweep = Sweep.from_json(d["sweep"])
        job = UUID(hex=d["job_id"].removeprefix("job-"))
        indexes = range(d["first"], d["first"] + d["count"])
        params = [sweep.params(i) for i in indexes]
        cur.execute(
            self.q(
                "INSERT INTO {schema}.tasks (id, job_id, idx, status, algorithm, iterations, "
                "agents, dimension) SELECT t.id, %s, t.idx, 'NEW', t.alg, t.it, t.ag, t.dim "
                "FROM unnest(%s::text[], %s::int[], %s::text[], %s::int[], %s::int[], %s::int[]) "
                "AS t(id, idx, alg, it, ag, dim) ON CONFLICT DO NOTHING"
            ),
            (
                d["job_id"],
                [task_id(job, i) for i in indexes],
                list(indexes),
                [p.algorithm for p in params],
                [p.iterations for p in params],
                [p.agents for p in params],
                [p.dimension for p in params],
            ),
        )

    def _task_ids(self, d: dict[str, Any]) -> list[str]:
        job = UUID(hex=d["job_id"].removeprefix("job-"))
        return [task_id(job, i) for i in d["indexes"]]

    def _on_TaskBlock_Claimed(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        d = m.data
        cur.execute(
            self.q(
                "UPDATE {schema}.tasks t SET status = 'RUNNING', assigned_to = u.holder, "
                "fence_token = u.fence, attempts = u.attempt, started_at = %s, error = NULL "
                "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::int[]) "
                "AS u(id, holder, fence, attempt) WHERE t.id = u.id"
            ),
            (d["at"], self._task_ids(d), d["holders"], d["fences"], d["attempts"]),
        )

    def _on_TaskBlock_Completed(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        d = m.data
        cur.execute(
            self.q(
                "UPDATE {schema}.tasks t SET status = 'DONE', assigned_to = NULL, "
                "finished_at = %s, runtime_ms = u.rt, iter = u.it, fopt = u.fopt, "
                "result_json = u.res FROM unnest(%s::text[], %s::bigint[], %s::bigint[], "
                "%s::float8[], %s::text[]) AS u(id, rt, it, fopt, res) WHERE t.id = u.id"
            ),
            (d["at"], self._task_ids(d), d["runtime_ms"], d["iters"], d["fopts"], d["results"]),
        )
        self._count(cur, d["job_id"], len(d["indexes"]), 0, d["at"])

    def _finish(self, cur: psycopg.Cursor[Any], d: dict[str, Any], errors: list[str]) -> None:
        statuses = ["NEW" if r else "FAILED" for r in d["retried"]]
        cur.execute(
            self.q(
                "UPDATE {schema}.tasks t SET status = u.status, assigned_to = NULL, "
                "error = u.error, finished_at = CASE WHEN u.status = 'FAILED' THEN %s END "
                "FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(id, status, error) "
                "WHERE t.id = u.id"
            ),
            (d["at"], self._task_ids(d), statuses, errors),
        )
        self._count(cur, d["job_id"], 0, statuses.count("FAILED"), d["at"])

    def _on_TaskBlock_Failed(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        self._finish(cur, m.data, m.data["errors"])

    def _on_TaskBlock_Reaped(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        self._finish(cur, m.data, [m.data["reason"]] * len(m.data["indexes"]))

    def _count(self, cur: psycopg.Cursor[Any], job: str, done: int, failed: int, at: datetime) -> None:
        if not (done or failed):
            return
        cur.execute(
            self.q(
                "UPDATE {schema}.jobs SET completed_tasks = completed_tasks + %s, "
                "failed_tasks = failed_tasks + %s WHERE id = %s"
            ),
            (done, failed, job),
        )
        cur.execute(
            self.q(
                "UPDATE {schema}.jobs SET finished_at = %s, status = CASE WHEN failed_tasks = 0 "
                "THEN 'DONE' ELSE 'FAILED' END WHERE id = %s "
                "AND completed_tasks + failed_tasks = total_tasks AND status = 'RUNNING'"
            ),
            (at, job),
        )

    def _on_Spot_Registered(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        cur.execute(
            self.q(
                "INSERT INTO {schema}.spots (id, ip_address, status, registered_at, "
                "last_heartbeat) VALUES (%s, %s, 'UP', %s, %s) ON CONFLICT DO NOTHING"
            ),
            (spot_id(m.aggregate_id), m.data["ip_address"], m.data["at"], m.data["at"]),
        )

    def _on_Spot_HeartbeatRecorded(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        d = m.data
        cur.execute(
            self.q(
                "UPDATE {schema}.spots SET ip_address = %s, cpu_load = %s, running_tasks = %s, "
                "total_cores = %s, last_heartbeat = %s WHERE id = %s"
            ),
            (d["ip_address"], d["cpu_load"], d["running_tasks"], d["total_cores"], d["at"],
             spot_id(m.aggregate_id)),
        )

    def _on_Spot_MarkedDown(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        self._spot_status(cur, m, "DOWN")

    def _on_Spot_CameUp(self, cur: psycopg.Cursor[Any], m: EventMessage) -> None:
        self._spot_status(cur, m, "UP")

    def _spot_status(self, cur: psycopg.Cursor[Any], m: EventMessage, status: str) -> None:
        cur.execute(
            self.q("UPDATE {schema}.spots SET status = %s WHERE id = %s"),
            (status, spot_id(m.aggregate_id)),
        )

    # ---- comparing with a rebuild --------------------------------------------------------

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the read-model tables, sorted: two equal dumps are equal read models."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        with self.conn.transaction():
            for table in ("jobs", "tasks", "spots"):
                rows = self.conn.execute(
                    self.q("SELECT * FROM {schema}." + table + " ORDER BY id")
                ).fetchall()
                out[table] = [tuple(r) for r in rows]
        return out

