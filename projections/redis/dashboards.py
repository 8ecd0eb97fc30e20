"""Redis read models: spot status and load, task counts by state, job progress.

Each event becomes one Lua script call that checks and advances the aggregate's
applied version and makes the event's changes atomically, so a redelivered
event changes nothing and a skipped version is reported as a gap. This Redis
keeps nothing on disk: a missing ``meta`` key means it lost everything, and the
runner rebuilds it from the event store.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import redis

from domain import agents, contexts, meshes, sagas, system, targets, workflows
from domain.agents import ACTIVE as AGENT_ACTIVE
from domain.agents import TERMINATED
from domain.ids import job_id, mesh_id, spot_id
from domain.registry import event_type
from domain.sagas.definitions import MESH_FORMATION
from domain.sagas.saga import ABORTED, COMPENSATED, COMPENSATING, COMPLETED
from domain.spots import DOWN, UP
from projections.dispatch import Unhandled
from projections.postgres.fleet import (
    FORMING,
    KIND_OF,
    MESH_ACTIVE,
    MESH_DISSOLVED,
    MESH_FAILED,
    MESH_PENDING,
)
from projections.status import DONE, FAILED, NEW, RUNNING
from schemas.codec import EventMessage

log = logging.getLogger(__name__)

APPLY = """
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new <= v then return 0 end
if new > v + 1 then return -1 end
-- An op's arguments: HSET and HINCRBY key field value; MOVE entity counts state;
-- MOVEIF entity counts from to; MOVEIFREF base hash counts from to (MOVEIF of the
-- entity base .. the 'ref' field of hash, if it has one); MOVEMIN entity counts n
-- atleast below.
local arity = {HSET = 3, HINCRBY = 3, MOVE = 3, MOVEIF = 4, MOVEIFREF = 5, MOVEMIN = 5}
local i = 3
while i <= #ARGV do
  local n = arity[ARGV[i]]
  if n == nil then return redis.error_reply('unknown op ' .. ARGV[i]) end
  i = i + n + 1
end
-- The entity's state becomes ``to``: the counts by state follow.
local function move(key, counts, to)
  local old = redis.call('HGET', key, 'state')
  if old == to then return end
  if old then redis.call('HINCRBY', counts, old, -1) end
  redis.call('HINCRBY', counts, to, 1)
  redis.call('HSET', key, 'state', to)
end
-- Only from state ``from`` ('' for an entity with no state yet).
local function move_if(key, counts, from, to)
  if (redis.call('HGET', key, 'state') or '') == from then move(key, counts, to) end
end
redis.call('HSET', KEYS[1], ARGV[1], new)
i = 3
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'HSET' then
    redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3])
  elseif op == 'HINCRBY' then
    redis.call('HINCRBY', ARGV[i+1], ARGV[i+2], ARGV[i+3])
  elseif op == 'MOVE' then
    move(ARGV[i+1], ARGV[i+2], ARGV[i+3])
  elseif op == 'MOVEIF' then
    move_if(ARGV[i+1], ARGV[i+2], ARGV[i+3], ARGV[i+4])
  elseif op == 'MOVEIFREF' then
    local ref = redis.call('HGET', ARGV[i+2], 'ref')
    if ref then move_if(ARGV[i+1] .. ref, ARGV[i+3], ARGV[i+4], ARGV[i+5]) end
  else
    -- MOVEMIN: ARGV[i+4] when n is at least the entity's 'min', else ARGV[i+5]
    local min = tonumber(redis.call('HGET', ARGV[i+1], 'min') or '0')
    if tonumber(ARGV[i+3]) >= min then
      move(ARGV[i+1], ARGV[i+2], ARGV[i+4])
    else
      move(ARGV[i+1], ARGV[i+2], ARGV[i+5])
    end
  end
  i = i + arity[op] + 1
end
return 1
"""


#: Field of the ``meta`` hash while the model is rebuilt from the store.
REBUILDING = "rebuilding"


class RedisKeys:
    """Where each dashboard lives, under one prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.applied = f"{prefix}:applied"
        self.meta = f"{prefix}:meta"
        self.counts = f"{prefix}:counts"
        #: Workflow runs by state (RUNNING, PAUSED, COMPLETED...).
        self.workflow_runs = f"{prefix}:workflow_runs"

        #: The fleet's counts by state: targets, agents, meshes (``fleet:...``), and
        #: sagas per kind (:meth:`sagas`).
        self.targets = f"{prefix}:fleet:targets"
        self.agents = f"{prefix}:fleet:agents"
        self.meshes = f"{prefix}:fleet:meshes"
        #: Target aggregate id → its current workloads, and → its target id.
        self.target_workloads = f"{prefix}:fleet:target_workloads"
        self.target_names = f"{prefix}:fleet:target_names"

    def sagas(self, kind: str) -> str:
        """Sagas of ``kind`` (agent_spawning, mesh_formation) by state."""
        return f"{self.prefix}:fleet:sagas:{kind}"

    def target(self, uuid: UUID) -> str:
        """A target's state (the counts' MOVE keeps it)."""
        return f"{self.prefix}:fleet:target:{uuid}"

    def mesh(self, mesh_id: str) -> str:
        """A mesh's state and ``min`` members."""
        return f"{self.prefix}:fleet:mesh:{mesh_id}"

    def saga(self, uuid: UUID) -> str:
        """A saga's state, and (``ref``) its mesh's id for a mesh formation."""
        return f"{self.prefix}:fleet:saga:{uuid}"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def spot(self, spot_id: str) -> str:
        return f"{self.prefix}:spot:{spot_id}"


#: ``(op, key, field, value)`` for HSET and HINCRBY; the fleet's state moves take more
#: (see ``APPLY``).
Op = tuple[str | int | float, ...]


Handler = Callable[[RedisKeys, EventMessage], list[Op]]


def _job_created(keys: RedisKeys, m: EventMessage) -> list[Op]:
    job = keys.job(job_id(m.aggregate_id))
    return [
        ("HSET", job, "total", m.data["total_tasks"]),
        ("HSET", job, "created_at", m.timestamp.isoformat()),
        ("HINCRBY", job, job_field(DONE), 0),
    ]


def _block_created(keys: RedisKeys, m: EventMessage) -> list[Op]:
    return _moves(keys, m, {NEW: m.data["count"]})


def _claimed(keys: RedisKeys, m: EventMessage) -> list[Op]:
    n = len(m.data["indexes"])
    return _moves(keys, m, {NEW: -n, RUNNING: n})


def _completed(keys: RedisKeys, m: EventMessage) -> list[Op]:
    n = len(m.data["indexes"])
    return _moves(keys, m, {RUNNING: -n, DONE: n})


def _failed_or_reaped(keys: RedisKeys, m: EventMessage) -> list[Op]:
    """A failed or reaped task is NEW again if it was retried, else FAILED."""
    n = len(m.data["indexes"])
    retried = sum(1 for r in m.data["retried"] if r)
    return _moves(keys, m, {RUNNING: -n, NEW: retried, FAILED: n - retried})


def _registered(keys: RedisKeys, m: EventMessage) -> list[Op]:
    spot, d = keys.spot(spot_id(m.aggregate_id)), m.data
    return [
        ("HSET", spot, "ipAddress", d["ip_address"]),
        ("HSET", spot, "status", UP),
        ("HSET", spot, "lastHeartbeat", d["at"].isoformat()),
        ("HINCRBY", keys.counts, "spots_up", 1),
    ]


def _heartbeat(keys: RedisKeys, m: EventMessage) -> list[Op]:
    spot, d = keys.spot(spot_id(m.aggregate_id)), m.data
    return [
        ("HSET", spot, "ipAddress", d["ip_address"]),
        ("HSET", spot, "cpuLoad", d["cpu_load"]),
        ("HSET", spot, "runningTasks", d["running_tasks"]),
        ("HSET", spot, "totalCores", d["total_cores"]),
        ("HSET", spot, "lastHeartbeat", d["at"].isoformat()),
    ]


def _marked_down(keys: RedisKeys, m: EventMessage) -> list[Op]:
    spot = keys.spot(spot_id(m.aggregate_id))
    return [("HSET", spot, "status", DOWN), ("HINCRBY", keys.counts, "spots_up", -1)]


def _came_up(keys: RedisKeys, m: EventMessage) -> list[Op]:
    spot = keys.spot(spot_id(m.aggregate_id))
    return [("HSET", spot, "status", UP), ("HINCRBY", keys.counts, "spots_up", 1)]


#: What each event type does to the dashboards.
HANDLERS: dict[str, Handler] = {
    "Job.Created": _job_created,
    "TaskBlock.Created": _block_created,
    "TaskBlock.Claimed": _claimed,
    "TaskBlock.Completed": _completed,
    "TaskBlock.Failed": _failed_or_reaped,
    "TaskBlock.Reaped": _failed_or_reaped,
    "Spot.Registered": _registered,
    "Spot.HeartbeatRecorded": _heartbeat,
    "Spot.MarkedDown": _marked_down,
    "Spot.CameUp": _came_up,
}


def _run_started(keys: RedisKeys, m: EventMessage) -> list[Op]:
    return [("HINCRBY", keys.workflow_runs, "RUNNING", 1)]


def _run_state_changed(keys: RedisKeys, m: EventMessage) -> list[Op]:
    """A run moved between states: the runs-by-state counters follow."""
    d = m.data
    return [
        ("HINCRBY", keys.workflow_runs, d["previous"], -1),
        ("HINCRBY", keys.workflow_runs, d["state"], 1),
    ]


HANDLERS["WorkflowRun.Started"] = _run_started
HANDLERS["WorkflowRun.StateChanged"] = _run_state_changed


# ---- the fleet: targets, agents, meshes and sagas by state; targets' workloads --------


def _target_registered(keys: RedisKeys, m: EventMessage) -> list[Op]:
    uuid = str(m.aggregate_id)
    return [
        ("HSET", keys.target_names, uuid, m.data["target_id"]),
        ("HINCRBY", keys.target_workloads, uuid, 0),
        ("MOVE", keys.target(m.aggregate_id), keys.targets, m.data["state"]),
    ]


def _target_updated(keys: RedisKeys, m: EventMessage) -> list[Op]:
    return [("MOVE", keys.target(m.aggregate_id), keys.targets, m.data["state"])]


def _workloads(n: int) -> Handler:
    def ops(keys: RedisKeys, m: EventMessage) -> list[Op]:
        return [("HINCRBY", keys.target_workloads, str(m.aggregate_id), n)]

    return ops


def _agent_spawned(keys: RedisKeys, m: EventMessage) -> list[Op]:
    return [("HINCRBY", keys.agents, AGENT_ACTIVE, 1)]


def _agent_terminated(keys: RedisKeys, m: EventMessage) -> list[Op]:
    """Only an ACTIVE agent is terminated (``Agent.terminate``)."""
    return [("HINCRBY", keys.agents, AGENT_ACTIVE, -1), ("HINCRBY", keys.agents, TERMINATED, 1)]


def _mesh_formed(keys: RedisKeys, m: EventMessage) -> list[Op]:
    """The mesh's own state replaces FORMING or FAILED (whichever aggregate came first)."""
    mesh = keys.mesh(mesh_id(m.aggregate_id))
    return [
        ("HSET", mesh, "min", m.data["min_members"]),
        ("MOVEMIN", mesh, keys.meshes, 0, MESH_ACTIVE, MESH_PENDING),
    ]


def _topology_changed(keys: RedisKeys, m: EventMessage) -> list[Op]:
    mesh = keys.mesh(mesh_id(m.aggregate_id))
    return [("MOVEMIN", mesh, keys.meshes, m.data["size"], MESH_ACTIVE, MESH_PENDING)]


def _mesh_dissolved(keys: RedisKeys, m: EventMessage) -> list[Op]:
    return [("MOVE", keys.mesh(mesh_id(m.aggregate_id)), keys.meshes, MESH_DISSOLVED)]


def _saga_moves(state: str) -> Handler:
    """The saga is now in ``state``; a formation saga that ends before its mesh is formed
    leaves the mesh FAILED."""

    def ops(keys: RedisKeys, m: EventMessage) -> list[Op]:
        kind = KIND_OF[m.aggregate_type]
        saga = keys.saga(m.aggregate_id)
        out: list[Op] = []
        if state == RUNNING and kind == MESH_FORMATION:  # Started
            mesh = json.loads(m.data["params"])["meshId"]
            out += [
                ("HSET", saga, "ref", mesh),  # the id, not the key: a rebuild has another prefix
                ("MOVEIF", keys.mesh(mesh), keys.meshes, "", FORMING),
            ]
        out.append(("MOVE", saga, keys.sagas(kind), state))
        if state in (COMPENSATED, ABORTED) and kind == MESH_FORMATION:
            out.append(("MOVEIFREF", keys.mesh(""), saga, keys.meshes, FORMING, MESH_FAILED))
        return out

    return ops


HANDLERS.update(
    {
        "Target.Registered": _target_registered,
        "Target.Updated": _target_updated,
        "Target.Reserved": _workloads(1),
        "Target.Released": _workloads(-1),
        "Agent.Spawned": _agent_spawned,
        "Agent.Terminated": _agent_terminated,
        "Mesh.Formed": _mesh_formed,
        "Mesh.TopologyChanged": _topology_changed,
        "Mesh.Dissolved": _mesh_dissolved,
    }
)
for _prefix in KIND_OF:
    HANDLERS.update(
        {
            f"{_prefix}.Started": _saga_moves(RUNNING),
            f"{_prefix}.CompensationStarted": _saga_moves(COMPENSATING),
            f"{_prefix}.Completed": _saga_moves(COMPLETED),
            f"{_prefix}.Compensated": _saga_moves(COMPENSATED),
            f"{_prefix}.Aborted": _saga_moves(ABORTED),
        }
    )

#: Fleet events that move no counter: contexts, and what changes no state.
FLEET_NOT_SHOWN: frozenset[str] = frozenset(
    event_type(e)
    for family in (
        targets.FAMILY,
        contexts.FAMILY,
        agents.FAMILY,
        meshes.FAMILY,
        sagas.FAMILY,
        system.FAMILY,
    )
    for e in family.events
) - frozenset(HANDLERS)


def ops_for(keys: RedisKeys, m: EventMessage) -> list[Op] | None:
    """The changes one event makes to the dashboards; None for a type with no handler."""
    handler = HANDLERS.get(m.type)
    return None if handler is None else handler(keys, m)


def job_field(state: str) -> str:
    """The field of a job's hash that counts its tasks in ``state`` (``done``...)."""
    return state.lower()


def _moves(keys: RedisKeys, m: EventMessage, moves: dict[str, int]) -> list[Op]:
    """Tasks of the block ``m`` moved between states, in the counts and in their job."""
    job = keys.job(m.data["job_id"])
    ops: list[Op] = []
    for state, n in moves.items():
        if n:
            ops.append(("HINCRBY", keys.counts, state, n))
            ops.append(("HINCRBY", job, job_field(state), n))
    return ops


class LagSamples:
    """Recent event-created → read-model-applied lags (ms), kept in a capped Redis list.

    The benchmark reads them for its p50/p99; operators can too.
    """

    KEEP = 20000
    #: Samples are sent to Redis at most this often (s): a round trip per applied
    #: batch cost the projectors a tenth of their time, on the path they measure.
    FLUSH_EVERY = 1.0

    def __init__(self, url: str, prefix: str, model: str):
        self.client: redis.Redis = redis.Redis.from_url(url, protocol=2)
        self.key = f"{prefix}:metrics:lag_ms:{model}"
        self.pending: list[float] = []
        self.flushed_at = 0.0

    def record(self, messages: Sequence[EventMessage]) -> None:
        now = datetime.now(UTC)
        self.pending.extend(round((now - m.timestamp).total_seconds() * 1000, 3) for m in messages)
        self.flush(older_than=self.FLUSH_EVERY)

    def flush(self, older_than: float = 0.0) -> None:
        """Send the samples recorded since the last flush, if that was ``older_than`` s ago.

        Measurements must never stop what they measure: while Redis is away the
        newest ``KEEP`` samples wait, and the error is only logged.
        """
        if not self.pending or time.monotonic() - self.flushed_at < older_than:
            return
        self.flushed_at = time.monotonic()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.lpush(self.key, *self.pending)
            pipe.ltrim(self.key, 0, self.KEEP - 1)
            pipe.execute()
        except redis.RedisError as error:
            del self.pending[: -self.KEEP]
            log.warning("lag samples not sent to Redis: %s", error)
            return
        self.pending = []


class RedisReadModel:
    """Applies events to the Redis dashboards under ``prefix``."""

    name = "redis"
    #: The event types it shows, and those it leaves out on purpose.
    HANDLED: frozenset[str] = frozenset(HANDLERS)
    #: Workflow events that move no dashboard counter.
    NOT_SHOWN: frozenset[str] = (
        frozenset(event_type(e) for e in workflows.FAMILY.events) - frozenset(HANDLERS)
    ) | FLEET_NOT_SHOWN
    #: Unreachable, loading, read-only (a replica) or out of memory: not the event's fault.
    transient: tuple[type[BaseException], ...] = (
        redis.ConnectionError,
        redis.TimeoutError,
        redis.exceptions.ReadOnlyError,
        redis.exceptions.OutOfMemoryError,
    )

    def __init__(self, url: str, prefix: str):
        self.keys = RedisKeys(prefix)
        self.client: redis.Redis = redis.Redis.from_url(url, protocol=2, decode_responses=True)
        self._apply = self.client.register_script(APPLY)
        self._unhandled = Unhandled(self.name, self.NOT_SHOWN)

    def close(self) -> None:
        self.client.close()

    def create(self) -> None:
        """Nothing to create: keys appear as events arrive."""

    def reset(self) -> None:
        """Drop every dashboard and mark the model as rebuilding until its next checkpoint.

        While it rebuilds, the query API reads from the PostgreSQL read model.
        """
        names = list(self.client.scan_iter(match=f"{self.keys.prefix}:*", count=1000))
        for start in range(0, len(names), 500):
            self.client.delete(*names[start : start + 500])
        self.client.hset(self.keys.meta, REBUILDING, 1)

    def checkpoint(self) -> int:
        value = self.client.hget(self.keys.meta, "checkpoint")
        return int(value) if value is not None else 0

    def set_checkpoint(self, position: int) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.meta, "checkpoint", position)
        pipe.hdel(self.keys.meta, REBUILDING)
        pipe.execute()

    def lost(self) -> bool:
        """True when Redis lost its keys (a restart: this Redis keeps nothing on disk)."""
        return not self.client.exists(self.keys.meta)

    def apply(self, messages: Sequence[EventMessage]) -> list[EventMessage]:
        pipe = self.client.pipeline(transaction=False)
        for m in messages:
            # An event with no handler changes nothing, but its version is applied.
            ops = ops_for(self.keys, m)
            if ops is None:
                self._unhandled.note(m.type)
            args: list[Any] = [str(m.aggregate_id), m.version]
            for op in ops or ():
                args.extend(op)
            self._apply(keys=[self.keys.applied], args=args, client=pipe)
        results = pipe.execute()
        return [m for m, r in zip(messages, results, strict=True) if r == -1]

    def dump(self) -> dict[str, Any]:
        """Every dashboard (a hash) and its fields, for comparing with a rebuild."""
        out: dict[str, Any] = {}
        for key in self.client.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
            short = key[len(self.keys.prefix) :]
            if short == ":meta" or short.startswith(":metrics:"):
                continue
            if self.client.type(key) == "hash":
                out[short] = self.client.hgetall(key)
        return out
