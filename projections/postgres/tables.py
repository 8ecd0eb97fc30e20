"""PostgreSQL read models: jobs, tasks with their results, spots (seed 003's tables).

Every change records the version it applied per aggregate in ``applied`` in the
same transaction, so a redelivered event changes nothing and a gap (a version
skipped) is seen and healed from the event store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any
from uuid import UUID

import psycopg
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from psycopg import sql

from domain.ids import job_id, parse_job_id, spot_id, task_id
from domain.jobs.sweeps import Sweep
from domain.spots import DOWN, UP
from projections.dispatch import Unhandled
from projections.postgres import fleet as fleet_tables
from projections.postgres import workflows as workflow_tables
from projections.status import (
    DONE,
    FAILED,
    NEW,
    RUNNING,
    job_running_sql,
    job_status,
    job_status_sql,
    literal,
)
from schemas.codec import EventMessage
from streaming.locks import READ_SCHEMA_LOCK

DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.jobs (
    id text PRIMARY KEY,
    status text NOT NULL,
    total_tasks bigint NOT NULL,
    completed_tasks bigint NOT NULL DEFAULT 0,
    failed_tasks bigint NOT NULL DEFAULT 0,
    jar_path text NOT NULL,
    main_class text NOT NULL,
    created_at timestamptz NOT NULL,
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS {schema}.tasks (
    id text PRIMARY KEY,
    job_id text NOT NULL,
    idx bigint NOT NULL,
    status text NOT NULL,
    algorithm text NOT NULL,
    iterations bigint NOT NULL,
    agents bigint NOT NULL,
    dimension bigint NOT NULL,
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
    running_tasks bigint NOT NULL DEFAULT 0,
    total_cores bigint NOT NULL DEFAULT 0,
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
-- A read schema made when these columns were integer is widened once, in place:
-- every value the API accepts fits a bigint.
DO $$
BEGIN
    IF (SELECT atttypid FROM pg_attribute WHERE attrelid = '{schema}.spots'::regclass
        AND attname = 'running_tasks') = 'int4'::regtype THEN
        ALTER TABLE {schema}.jobs ALTER total_tasks TYPE bigint,
            ALTER completed_tasks TYPE bigint, ALTER failed_tasks TYPE bigint;
        ALTER TABLE {schema}.tasks ALTER idx TYPE bigint, ALTER iterations TYPE bigint,
            ALTER agents TYPE bigint, ALTER dimension TYPE bigint;
        ALTER TABLE {schema}.spots ALTER running_tasks TYPE bigint,
            ALTER total_cores TYPE bigint;
    END IF;
END
$$;
"""

#: A job's counts and status from what its tasks show (see ``_write``).
_JOBS_FROM_TASKS = (
    "UPDATE {schema}.jobs j SET completed_tasks = t.done, failed_tasks = t.failed, "
    f"status = {job_status_sql('j.total_tasks', 't.done', 't.failed')}, "
    f"finished_at = CASE WHEN {job_running_sql('j.total_tasks', 't.done', 't.failed')} "
    "THEN NULL ELSE t.at END FROM (SELECT job_id, "
    f"count(*) FILTER (WHERE status = {literal(DONE)}) AS done, "
    f"count(*) FILTER (WHERE status = {literal(FAILED)}) AS failed, "
    f"max(finished_at) FILTER (WHERE status IN ({literal(DONE)}, {literal(FAILED)})) AS at "
    "FROM {schema}.tasks WHERE job_id = ANY(%s) GROUP BY job_id) t "
    "WHERE j.id = t.job_id"
)

#: The jobs whose last task this batch finished: their status and when they finished.
_JOBS_FINISHED = (
    "UPDATE {schema}.jobs j SET finished_at = u.at, "
    f"status = {job_status_sql('j.total_tasks', 'j.completed_tasks', 'j.failed_tasks')} "
    "FROM unnest(%s::text[], %s::timestamptz[]) AS u(id, at) WHERE j.id = u.id "
    f"AND j.status = {literal(RUNNING)} "
    f"AND NOT ({job_running_sql('j.total_tasks', 'j.completed_tasks', 'j.failed_tasks')})"
)

#: A stored aggregate's first event, from the event store (``StoreReader.first_event``).
FirstEvent = Callable[[UUID], EventMessage | None]


_TYPES = {
    "status": "text",
    "assigned_to": "text",
    "fence_token": "bigint",
    "attempts": "int",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "runtime_ms": "bigint",
    "iter": "bigint",
    "fopt": "float8",
    "result_json": "text",
    "error": "text",
    "ip_address": "text",
    "cpu_load": "float8",
    "running_tasks": "bigint",
    "total_cores": "bigint",
    "last_heartbeat": "timestamptz",
}


class _Changes:
    """What a batch of events does to the tables, merged per row in event order."""

    def __init__(self, sweep_of: Callable[[UUID], Sweep]) -> None:
        self.sweep_of = sweep_of
        self.jobs: list[tuple[Any, ...]] = []
        self.task_inserts: list[tuple[Any, ...]] = []
        self.spots_new: list[tuple[Any, ...]] = []
        self.tasks: dict[str, dict[str, Any]] = {}
        self.spots: dict[str, dict[str, Any]] = {}
        #: job id → [completed delta, failed delta, time of the last change]
        self.job_counts: dict[str, list[Any]] = {}
        #: Workflow statements, in event order (a low-rate family: no merging).
        self.workflow: list[workflow_tables.Statement] = []
        #: Targets', contexts', agents', meshes' and sagas' statements, in event order.
        self.fleet: list[workflow_tables.Statement] = []

    def add(self, m: EventMessage) -> bool:
        """Add what ``m`` does; False (and nothing added) for a type with no handler."""
        statements = workflow_tables.HANDLERS.get(m.type)
        if statements is not None:
            self.workflow.extend(statements(m))
            return True
        statements = fleet_tables.HANDLERS.get(m.type)
        if statements is not None:
            self.fleet.extend(statements(m))
            return True
        handler = HANDLERS.get(m.type)
        if handler is None:
            return False
        handler(self, m)
        return True

    def _task_ids(self, d: dict[str, Any]) -> list[str]:
        job = parse_job_id(d["job_id"])
        return [task_id(job, i) for i in d["indexes"]]

    def _set_tasks(self, ids: list[str], **columns: list[Any]) -> None:
        for n, tid in enumerate(ids):
            row = self.tasks.setdefault(tid, {})
            for col, values in columns.items():
                row[col] = values[n]

    def _count(self, job: str, done: int, failed: int, at: datetime) -> None:
        if done or failed:
            entry = self.job_counts.setdefault(job, [0, 0, at])
            entry[0] += done
            entry[1] += failed
            entry[2] = at

    def _job_created(self, m: EventMessage) -> None:
        sweep = Sweep.from_json(m.data["sweep"])
        total = m.data["total_tasks"]
        self.jobs.append(
            (
                job_id(m.aggregate_id),
                job_status(total, 0, 0),
                total,
                sweep.jar_path,
                sweep.main_class,
                m.timestamp,
            )
        )

    def _block_created(self, m: EventMessage) -> None:
        d = m.data
        job = parse_job_id(d["job_id"])
        sweep = self.sweep_of(job)
        indexes = range(d["first"], d["first"] + d["count"])
        params = [sweep.params(i) for i in indexes]
        self.task_inserts.append(
            (
                [task_id(job, i) for i in indexes],
                [d["job_id"]] * len(indexes),
                list(indexes),
                [p.algorithm for p in params],
                [p.iterations for p in params],
                [p.agents for p in params],
                [p.dimension for p in params],
            )
        )

    def _claimed(self, m: EventMessage) -> None:
        d = m.data
        n = len(d["indexes"])
        self._set_tasks(
            self._task_ids(d),
            status=[RUNNING] * n,
            assigned_to=d["holders"],
            fence_token=d["fences"],
            attempts=d["attempts"],
            started_at=[d["at"]] * n,
            error=[None] * n,
        )

    def _completed(self, m: EventMessage) -> None:
        d = m.data
        n = len(d["indexes"])
        self._set_tasks(
            self._task_ids(d),
            status=[DONE] * n,
            assigned_to=[None] * n,
            finished_at=[d["at"]] * n,
            runtime_ms=d["runtime_ms"],
            iter=d["iters"],
            fopt=d["fopts"],
            result_json=d["results"],
        )
        self._count(d["job_id"], n, 0, d["at"])

    def _finish(self, d: dict[str, Any], errors: list[str]) -> None:
        statuses = [NEW if r else FAILED for r in d["retried"]]
        self._set_tasks(
            self._task_ids(d),
            status=statuses,
            assigned_to=[None] * len(statuses),
            error=errors,
            finished_at=[d["at"] if s == FAILED else None for s in statuses],
        )
        self._count(d["job_id"], 0, statuses.count(FAILED), d["at"])

    def _failed(self, m: EventMessage) -> None:
        self._finish(m.data, m.data["errors"])

    def _reaped(self, m: EventMessage) -> None:
        self._finish(m.data, [m.data["reason"]] * len(m.data["indexes"]))

    def _registered(self, m: EventMessage) -> None:
        at = m.data["at"]
        self.spots_new.append((spot_id(m.aggregate_id), m.data["ip_address"], at, at))

    def _heartbeat(self, m: EventMessage) -> None:
        d = m.data
        self.spots.setdefault(spot_id(m.aggregate_id), {}).update(
            ip_address=d["ip_address"],
            cpu_load=d["cpu_load"],
            running_tasks=d["running_tasks"],
            total_cores=d["total_cores"],
            last_heartbeat=d["at"],
        )

    def _marked_down(self, m: EventMessage) -> None:
        self.spots.setdefault(spot_id(m.aggregate_id), {})["status"] = DOWN

    def _came_up(self, m: EventMessage) -> None:
        self.spots.setdefault(spot_id(m.aggregate_id), {})["status"] = UP


#: What each event type does to the tables.
HANDLERS: dict[str, Callable[[_Changes, EventMessage], None]] = {
    "Job.Created": _Changes._job_created,
    "TaskBlock.Created": _Changes._block_created,
    "TaskBlock.Claimed": _Changes._claimed,
    "TaskBlock.Completed": _Changes._completed,
    "TaskBlock.Failed": _Changes._failed,
    "TaskBlock.Reaped": _Changes._reaped,
    "Spot.Registered": _Changes._registered,
    "Spot.HeartbeatRecorded": _Changes._heartbeat,
    "Spot.MarkedDown": _Changes._marked_down,
    "Spot.CameUp": _Changes._came_up,
}


class PostgresReadModel:
    """Applies events to the tables in ``schema`` (sync psycopg; one projector process)."""

    name = "postgres"
    #: The event types it shows, and those it leaves out on purpose.
    HANDLED: frozenset[str] = (
        frozenset(HANDLERS) | frozenset(workflow_tables.HANDLERS) | frozenset(fleet_tables.HANDLERS)
    )
    NOT_SHOWN: frozenset[str] = workflow_tables.NOT_SHOWN | fleet_tables.NOT_SHOWN
    #: The database, or the store it reads a job's sweep from, is away: not the event's fault.
    transient: tuple[type[BaseException], ...] = (
        psycopg.OperationalError,
        psycopg.InterfaceError,
        psycopg.errors.ReadOnlySqlTransaction,  # a standby, or a database set read-only
        psycopg.errors.UndefinedTable,  # its tables dropped: created again on the retry
        StoreOperationalError,
        StoreInterfaceError,
    )

    def __init__(self, conninfo: str, schema: str, first_event: FirstEvent):
        """``first_event`` reads a job's ``Job.Created`` from the event store.

        A task block names its job; the job's sweep gives the tasks' parameters.
        The job's event travels on another partition and may not be applied yet,
        but it was stored in the same transaction as its blocks, so the store has it.
        """
        self.conninfo = conninfo
        self.schema = schema
        self._first_event = first_event
        # A job's blocks come together (one writer batch), so a few parsed sweeps do.
        self._sweep = lru_cache(maxsize=8)(self._stored_sweep)
        self._conn: psycopg.Connection[Any] | None = None
        self._s = sql.Identifier(schema)
        self._queries: dict[str, bytes] = {}
        self._unhandled = Unhandled(self.name, self.NOT_SHOWN)

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The connection, opened anew if the last one broke (the database restarted)."""
        if self._conn is None or self._conn.closed or self._conn.broken:
            if self._conn is not None:
                self._conn.close()
            # Derived data: a commit lost in a crash leaves the model (and its tracking,
            # committed atomically with it) a little behind, and the store heals it, so
            # read-model commits need not wait for the WAL flush the event store waits for.
            self._conn = psycopg.connect(
                self.conninfo,
                autocommit=False,
                connect_timeout=5,
                options="-c synchronous_commit=off",
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _stored_sweep(self, job: UUID) -> Sweep:
        created = self._first_event(job)
        if created is None or created.type != "Job.Created":
            raise LookupError(f"job {job} has no Job.Created in the event store")
        return Sweep.from_json(created.data["sweep"])

    def q(self, text: str) -> bytes:
        """``text`` with ``{schema}`` filled in, composed once per statement."""
        query = self._queries.get(text)
        if query is None:
            query = self._queries[text] = sql.SQL(text).format(schema=self._s).as_bytes(self.conn)
        return query

    def create(self) -> None:
        with self.conn.transaction():
            self.conn.execute(*READ_SCHEMA_LOCK.xact_lock())
            self.conn.execute(self.q(DDL))
            self.conn.execute(self.q(workflow_tables.DDL))
            self.conn.execute(self.q(fleet_tables.DDL))

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

        One transaction for the whole batch: the effects, merged per row (the last
        event's value wins, counters add up), and the versions they bring the
        ``applied`` table to.
        """
        gaps: list[EventMessage] = []
        changes = _Changes(self._sweep)
        # Pipelined: BEGIN and the SELECT go together; then the writes and the
        # COMMIT, which need no answers, in one more round trip.
        with self.conn.pipeline(), self.conn.transaction(), self.conn.cursor() as cur:
            ids = list({m.aggregate_id for m in messages})
            cur.execute(
                self.q(
                    "SELECT aggregate_id, version FROM {schema}.applied "
                    "WHERE aggregate_id = ANY(%s) FOR UPDATE"
                ),
                (ids,),
            )
            versions: dict[UUID, int] = {row[0]: row[1] for row in cur.fetchall()}
            touched: dict[UUID, int] = {}
            for m in messages:
                current = versions.get(m.aggregate_id, 0)
                if m.version <= current:
                    continue
                if m.version > current + 1:
                    gaps.append(m)
                    continue
                # An event with no handler changes nothing, but its version is applied.
                if not changes.add(m):
                    self._unhandled.note(m.type)
                versions[m.aggregate_id] = touched[m.aggregate_id] = m.version
            self._write(cur, changes)
            if touched:
                cur.execute(
                    self.q(
                        "INSERT INTO {schema}.applied SELECT * FROM unnest(%s::uuid[], "
                        "%s::bigint[]) ON CONFLICT (aggregate_id) DO UPDATE "
                        "SET version = EXCLUDED.version "
                        "WHERE {schema}.applied.version < EXCLUDED.version"
                    ),
                    (list(touched), list(touched.values())),
                )
        return gaps

    def _write(self, cur: psycopg.Cursor[Any], c: _Changes) -> None:
        for statement, params in workflow_tables.in_bulk(c.workflow):
            cur.execute(self.q(statement), params)
        for statement, params in c.fleet:
            cur.execute(self.q(statement), params)
        if c.jobs:
            cur.executemany(
                self.q(
                    "INSERT INTO {schema}.jobs (id, status, total_tasks, jar_path, main_class, "
                    "created_at) VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
                ),
                c.jobs,
            )
            # A job and its blocks are different aggregates, so on different
            # partitions: its blocks' completions and failures may be applied before
            # the job itself, when their counts found no row. Count what its tasks
            # already show (before this batch's changes, which are added below).
            cur.execute(self.q(_JOBS_FROM_TASKS), ([row[0] for row in c.jobs],))
        for rows in c.task_inserts:
            cur.execute(
                self.q(
                    "INSERT INTO {schema}.tasks (id, job_id, idx, status, algorithm, iterations, "
                    f"agents, dimension) SELECT t.id, t.job, t.idx, {literal(NEW)}, t.alg, t.it, t.ag, t.dim "
                    "FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[], %s::bigint[], "
                    "%s::bigint[], %s::bigint[]) AS t(id, job, idx, alg, it, ag, dim) "
                    "ON CONFLICT DO NOTHING"
                ),
                rows,
            )
        if c.spots_new:
            cur.executemany(
                self.q(
                    "INSERT INTO {schema}.spots (id, ip_address, status, registered_at, "
                    f"last_heartbeat) VALUES (%s, %s, {literal(UP)}, %s, %s) ON CONFLICT DO NOTHING"
                ),
                c.spots_new,
            )
        self._update(cur, "tasks", c.tasks)
        self._update(cur, "spots", c.spots)
        if c.job_counts:
            jobs = list(c.job_counts)
            cur.execute(
                self.q(
                    "UPDATE {schema}.jobs j SET completed_tasks = completed_tasks + u.done, "
                    "failed_tasks = failed_tasks + u.failed FROM unnest(%s::text[], %s::bigint[], "
                    "%s::bigint[]) AS u(id, done, failed) WHERE j.id = u.id"
                ),
                (jobs, [c.job_counts[j][0] for j in jobs], [c.job_counts[j][1] for j in jobs]),
            )
            cur.execute(self.q(_JOBS_FINISHED), (jobs, [c.job_counts[j][2] for j in jobs]))

    def _update(
        self, cur: psycopg.Cursor[Any], table: str, rows: dict[str, dict[str, Any]]
    ) -> None:
        """One UPDATE ... FROM unnest per set of changed columns."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for key, changed in rows.items():
            groups.setdefault(tuple(sorted(changed)), []).append(key)
        for columns, keys in groups.items():
            sets = ", ".join(f"{col} = u.{col}" for col in columns)
            casts = ", ".join(f"%s::{_TYPES[col]}[]" for col in columns)
            names = ", ".join(columns)
            cur.execute(
                self.q(
                    f"UPDATE {{schema}}.{table} t SET {sets} FROM unnest(%s::text[], {casts}) "
                    f"AS u(id, {names}) WHERE t.id = u.id"
                ),
                [keys, *([rows[k][col] for k in keys] for col in columns)],
            )

    # ---- comparing with a rebuild --------------------------------------------------------

    def dump(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the read-model tables, sorted: two equal dumps are equal read models."""
        out: dict[str, list[tuple[Any, ...]]] = {}
        with self.conn.transaction():
            for table, key in (
                ("jobs", "id"),
                ("tasks", "id"),
                ("spots", "id"),
                ("workflow_definitions", "namespace, workflow_name, version"),
                ("workflow_instances", "instance_id"),
                ("task_executions", "execution_id"),
                ("execution_leases", "lease_key"),
                ("events", "event_id"),
                *fleet_tables.TABLES,
            ):
                rows = self.conn.execute(
                    self.q(f"SELECT * FROM {{schema}}.{table} ORDER BY {key}")
                ).fetchall()
                out[table] = [tuple(r) for r in rows]
        return out
