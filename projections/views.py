"""What the query API reads: the read models, asynchronously.

Each view can tell which versions of some aggregates it has applied, so a query
right after a client's own command can wait for that command's effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import psycopg
import redis.asyncio as aioredis
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from domain.sagas.saga import SAGA_KINDS
from domain.spots import UP
from projections.redis.dashboards import REBUILDING, RedisKeys, job_field
from projections.status import DONE, FAILED, job_status, literal

#: Seconds a query waits for a read-model connection before it gives up (503).
UNAVAILABLE_AFTER = 2.0

#: What the query API can tell of Redis.
CONNECTED, REBUILDING_STATE, DISCONNECTED = "connected", "rebuilding", "disconnected"


class VersionedView(Protocol):
    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]: ...


async def wait_until_applied(
    view: VersionedView, wanted: Mapping[UUID, int], timeout: float
) -> int:
    """Wait (up to ``timeout`` s) until ``view`` has applied ``wanted`` versions.

    Returns how many versions it is still behind, summed over ``wanted``: 0 when
    it caught up, so a caller that gave up can say how stale its answer is.
    """
    if not wanted:
        return 0
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        behind = _behind(await view.applied(list(wanted)), wanted)
        if not behind or time.monotonic() >= deadline:
            return behind
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)


def _behind(have: Mapping[UUID, int], wanted: Mapping[UUID, int]) -> int:
    return sum(max(0, v - have.get(u, 0)) for u, v in wanted.items())


class RedisViews:
    """Job progress, task counts by state and spot status from Redis."""

    def __init__(self, url: str, prefix: str):
        self.client: aioredis.Redis = aioredis.Redis.from_url(
            url,
            protocol=2,
            decode_responses=True,
            # A Redis that does not answer is "disconnected" in 2 s, not a hung query.
            socket_connect_timeout=UNAVAILABLE_AFTER,
            socket_timeout=UNAVAILABLE_AFTER,
        )
        self.keys = RedisKeys(prefix)

    async def close(self) -> None:
        await self.client.aclose()

    async def state(self) -> str:
        """``connected``, ``rebuilding`` (it lost its keys; the projector is refilling
        it) or ``disconnected``. Only a connected Redis is read from."""
        try:
            meta: dict[str, str] = await self.client.hgetall(self.keys.meta)  # type: ignore[assignment]
        except aioredis.RedisError:
            return DISCONNECTED
        return REBUILDING_STATE if not meta or REBUILDING in meta else CONNECTED

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]:
        values = await self.client.hmget(self.keys.applied, [str(u) for u in uuids])
        return {u: int(v) for u, v in zip(uuids, values, strict=True) if v is not None}

    async def job(self, job_id: str) -> dict[str, Any] | None:
        data: dict[str, str] = await self.client.hgetall(self.keys.job(job_id))  # type: ignore[assignment]
        if "total" not in data:
            return None
        total = int(data["total"])
        done = int(data.get(job_field(DONE), 0))
        failed = int(data.get(job_field(FAILED), 0))
        return {
            "id": job_id,
            "status": job_status(total, done, failed),
            "totalTasks": total,
            "completedTasks": done,
            "failedTasks": failed,
            "createdAt": data["created_at"].replace("+00:00", "Z"),
        }

    async def counts(self) -> dict[str, int]:
        raw: dict[str, str] = await self.client.hgetall(self.keys.counts)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items()}

    async def workflow_runs(self) -> dict[str, int]:
        """Workflow runs by state (only states some run is in)."""
        raw: dict[str, str] = await self.client.hgetall(self.keys.workflow_runs)  # type: ignore[assignment]
        return {k: int(v) for k, v in raw.items() if int(v)}

    async def read_model_lag_ms(self, samples: int = 1000) -> float:
        """The mean of the PostgreSQL read model's latest lag samples (event stored →
        applied, ms; :class:`~projections.redis.dashboards.LagSamples`); 0 when none."""
        raw: list[str] = await self.client.lrange(  # type: ignore[assignment]
            f"{self.keys.prefix}:metrics:lag_ms:postgres", 0, samples - 1
        )
        return sum(float(x) for x in raw) / len(raw) if raw else 0.0

    async def fleet(self) -> dict[str, dict[str, int]]:
        """The fleet's counts, as :meth:`PostgresViews.fleet_counts` gives them: targets,
        agents, meshes and sagas by state (only states something is in), sagas of each
        kind by state (``agent_spawning``, ``mesh_formation``), and ``targetWorkloads``
        (target id → its current workloads)."""
        k = self.keys
        pipe = self.client.pipeline(transaction=False)
        for key in (k.targets, k.agents, k.meshes, k.target_workloads, k.target_names):
            pipe.hgetall(key)
        for kind in SAGA_KINDS:
            pipe.hgetall(k.sagas(kind))
        targets, agents, meshes, workloads, names, *by_kind = await pipe.execute()
        out = {
            "targets": _counts(targets),
            "agents": _counts(agents),
            "meshes": _counts(meshes),
            "sagas": {},
            **{kind: _counts(raw) for kind, raw in zip(SAGA_KINDS, by_kind, strict=True)},
            "targetWorkloads": {
                names[uuid]: int(n) for uuid, n in workloads.items() if uuid in names
            },
        }
        for kind in SAGA_KINDS:
            for state, n in out[kind].items():
                out["sagas"][state] = out["sagas"].get(state, 0) + n
        return out


def _counts(raw: Mapping[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in raw.items() if int(v)}


class PostgresViews:
    """Results and spots from the PostgreSQL read model."""

    def __init__(self, conninfo: str, schema: str):
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=4,
            open=False,
            # A query never waits long for a database that is away: it answers 503.
            timeout=UNAVAILABLE_AFTER,
            # A connection that broke while idle (the database restarted) is replaced
            # before it is handed out, not found broken by a query.
            check=AsyncConnectionPool.check_connection,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "options": "-c TimeZone=UTC",
                "connect_timeout": 2,
            },
        )
        self.schema = sql.Identifier(schema)

    async def open(self) -> None:
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self.schema)

    async def ping(self) -> bool:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT 1")
        return True

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                self._q(
                    "SELECT aggregate_id, version FROM {schema}.applied "
                    "WHERE aggregate_id = ANY(%s)"
                ),
                (uuids,),
            )
            return {row["aggregate_id"]: row["version"] for row in await cur.fetchall()}

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """The job as the Redis view shows it, from the PostgreSQL read model."""
        row = None
        async with self.pool.connection() as conn, _until_created():
            cur = await conn.execute(
                self._q(
                    "SELECT id, status, total_tasks, completed_tasks, failed_tasks, created_at "
                    "FROM {schema}.jobs WHERE id = %s"
                ),
                (job_id,),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return {
            "id": row["id"],
            "status": row["status"],
            "totalTasks": row["total_tasks"],
            "completedTasks": row["completed_tasks"],
            "failedTasks": row["failed_tasks"],
            "createdAt": _iso(row["created_at"]),
        }

    async def counts(self) -> dict[str, int]:
        """Task counts by state and the spots UP, as the Redis view counts them."""
        async with self.pool.connection() as conn, _until_created():
            cur = await conn.execute(
                self._q(
                    "SELECT status, count(*) AS n FROM {schema}.tasks GROUP BY status "
                    "UNION ALL SELECT 'spots_up', count(*) FROM {schema}.spots "
                    f"WHERE status = {literal(UP)}"
                )
            )
            return {row["status"]: int(row["n"]) for row in await cur.fetchall()}
        return {}

    async def results(self, job_id: str) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, _until_created():
            cur = await conn.execute(
                self._q(
                    "SELECT id, algorithm, iterations, fopt, runtime_ms, finished_at "
                    "FROM {schema}.tasks WHERE job_id = %s "
                    f"AND status = {literal(DONE)} ORDER BY idx"
                ),
                (job_id,),
            )
            return [
                {
                    "taskId": r["id"],
                    "algorithm": r["algorithm"],
                    "iterations": r["iterations"],
                    "fopt": r["fopt"],
                    "runtimeMs": r["runtime_ms"],
                    "finishedAt": _iso(r["finished_at"]),
                }
                for r in await cur.fetchall()
            ]
        return []

    async def spots(self) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn, _until_created():
            cur = await conn.execute(
                self._q("SELECT * FROM {schema}.spots ORDER BY registered_at, id")
            )
            return [
                {
                    "id": r["id"],
                    "ipAddress": r["ip_address"],
                    "status": r["status"],
                    "cpuLoad": r["cpu_load"],
                    "runningTasks": r["running_tasks"],
                    "totalCores": r["total_cores"],
                    "lastHeartbeat": _iso(r["last_heartbeat"]),
                }
                for r in await cur.fetchall()
            ]
        return []

    # ---- the fleet: agents, meshes, sagas, contexts, targets ------------------------------

    async def _one(self, query: str, params: tuple[Any, ...]) -> dict[str, Any] | None:
        row: dict[str, Any] | None = None
        async with self.pool.connection() as conn, _until_created():
            cur = await conn.execute(self._q(query), params)
            row = await cur.fetchone()
        return row

    async def _all(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        async with self.pool.connection() as conn, _until_created():
            cur = await conn.execute(self._q(query), params)
            rows = await cur.fetchall()
        return rows

    async def agent(self, agent_id: str) -> dict[str, Any] | None:
        row = await self._one("SELECT * FROM {schema}.agents WHERE id = %s", (agent_id,))
        return None if row is None else _agent(row)

    async def meshes(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Meshes (in ``state``, or all), the newest first."""
        rows = await self._all(
            "SELECT * FROM {schema}.meshes WHERE (%s::text IS NULL OR state = %s) "
            "ORDER BY coalesce(formed_at, updated_at) DESC, id DESC LIMIT %s",
            (state, state, limit),
        )
        return [_mesh(r) for r in rows]

    async def mesh(self, mesh_id: str) -> dict[str, Any] | None:
        row = await self._one("SELECT * FROM {schema}.meshes WHERE id = %s", (mesh_id,))
        return None if row is None else _mesh(row)

    async def sagas(self, states: list[str], kind: str | None, limit: int) -> list[dict[str, Any]]:
        """Sagas in ``states`` (all when empty) of ``kind`` (all when None), newest first."""
        rows = await self._all(
            "SELECT id, kind, state, reason, started_at, ended_at, updated_at FROM {schema}.sagas "
            "WHERE (cardinality(%s::text[]) = 0 OR state = ANY(%s::text[])) "
            "AND (%s::text IS NULL OR kind = %s) "
            "ORDER BY started_at DESC, id DESC LIMIT %s",
            (states, states, kind, kind, limit),
        )
        return [
            {
                "id": r["id"],
                "sagaId": r["id"],
                "kind": r["kind"],
                "state": r["state"],
                "reason": r["reason"],
                "startedAt": _iso(r["started_at"]),
                "endedAt": _iso(r["ended_at"]),
                "updatedAt": _iso(r["updated_at"]),
            }
            for r in rows
        ]

    async def context(self, context_id: str) -> dict[str, Any] | None:
        row = await self._one(
            "SELECT id, hierarchies, properties, created_at, updated_at "
            "FROM {schema}.execution_contexts WHERE id = %s",
            (context_id,),
        )
        if row is None:
            return None
        return {
            "contextId": row["id"],
            "hierarchies": row["hierarchies"],
            "properties": row["properties"],
            "createdAt": _iso_utc(row["created_at"]),
            "updatedAt": _iso_utc(row["updated_at"]),
        }

    async def target_status(self, target_id: str) -> dict[str, Any] | None:
        """Seed 000's TargetStatus (its snake_case names): usage as a fraction of the
        target's limits (0 when a limit is 0)."""
        row = await self._one(
            "SELECT id, state, current_workloads, resource_usage, resource_limits, "
            "last_heartbeat FROM {schema}.target_states WHERE id = %s",
            (target_id,),
        )
        if row is None:
            return None
        used, limits = row["resource_usage"], row["resource_limits"]
        return {
            "target_id": row["id"],
            "state": row["state"],
            "current_workloads": row["current_workloads"],
            "resource_usage": {
                "cpu_usage": _fraction(used["cpu_millicores"], limits["cpu_millicores"]),
                "memory_usage": _fraction(used["memory_bytes"], limits["memory_bytes"]),
            },
            "last_heartbeat": _iso_utc(row["last_heartbeat"]),
        }

    async def fleet_counts(self) -> dict[str, dict[str, int]]:
        """Targets, agents, meshes and sagas by state, sagas of each kind by state and
        each target's current workloads, as :meth:`RedisViews.fleet` gives them."""
        rows = await self._all(
            "SELECT 'targets' AS what, state AS name, count(*) AS n "
            "FROM {schema}.target_states GROUP BY state "
            "UNION ALL SELECT 'agents', state, count(*) FROM {schema}.agents GROUP BY state "
            "UNION ALL SELECT 'meshes', state, count(*) FROM {schema}.meshes GROUP BY state "
            "UNION ALL SELECT 'sagas', state, count(*) FROM {schema}.sagas GROUP BY state "
            "UNION ALL SELECT kind, state, count(*) FROM {schema}.sagas GROUP BY kind, state "
            "UNION ALL SELECT 'targetWorkloads', id, current_workloads "
            "FROM {schema}.target_states"
        )
        out: dict[str, dict[str, int]] = {
            "targets": {},
            "agents": {},
            "meshes": {},
            "sagas": {},
            **{kind: {} for kind in SAGA_KINDS},
            "targetWorkloads": {},
        }
        for r in rows:
            out.setdefault(r["what"], {})[r["name"]] = int(r["n"])
        return out


def _agent(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "agentId": r["id"],
        "targetId": r["target_id"],
        "meshId": r["mesh_id"],
        "state": r["state"],
        "capabilities": r["capabilities"],
        "performance": r["performance"],
        "cpuMillicores": r["cpu_millicores"],
        "memoryBytes": r["memory_bytes"],
        "sagaId": r["saga_id"],
        "spawnedAt": _iso(r["spawned_at"]),
        "endedAt": _iso(r["ended_at"]),
        "updatedAt": _iso(r["updated_at"]),
    }


def _mesh(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "meshId": r["id"],
        "state": r["state"],
        "topology": r["topology"],
        "requiredCapabilities": r["required_capabilities"],
        "minMembers": r["min_members"],
        "maxMembers": r["max_members"],
        "members": r["members"],
        "performance": r["performance"],
        "sagaId": r["saga_id"],
        "formedAt": _iso(r["formed_at"]),
        "endedAt": _iso(r["ended_at"]),
        "updatedAt": _iso(r["updated_at"]),
    }


def _fraction(used: int, limit: int) -> float:
    return used / limit if limit > 0 else 0.0


@contextlib.asynccontextmanager
async def _until_created() -> AsyncIterator[None]:
    """A read model its projector has not created yet reads as empty (it has no rows)."""
    with contextlib.suppress(psycopg.errors.UndefinedTable):
        yield


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    text: str = value.isoformat().replace("+00:00", "Z")
    return text


def _iso_utc(value: datetime | None) -> str | None:
    """A ``TIMESTAMP`` column's value (UTC, without a time zone) as ISO 8601 with ``Z``."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")
