"""Redis read models: spot status and load, task counts by state, job progress.

Each event becomes one Lua script call that checks and advances the aggregate's
applied version and makes the event's changes atomically, so a redelivered
event changes nothing and a skipped version is reported as a gap. This Redis
keeps nothing on disk: a missing ``meta`` key means it lost everything, and the
runner rebuilds it from the event store.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import redis

from domain import workflows
from domain.ids import job_id, spot_id
from domain.registry import event_type
from domain.spots import DOWN, UP
from projections.dispatch import Unhandled
from projections.status import DONE, FAILED, NEW, RUNNING
from schemas.codec import EventMessage

log = logging.getLogger(__name__)

APPLY = """
local v = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local new = tonumber(ARGV[2])
if new <= v then return 0 end
if new > v + 1 then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], new)
local i = 3
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'HSET' then
    redis.call('HSET', ARGV[i+1], ARGV[i+2], ARGV[i+3])
  elseif op == 'HINCRBY' then
    redis.call('HINCRBY', ARGV[i+1], ARGV[i+2], ARGV[i+3])
  end
  i = i + 4
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

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def spot(self, spot_id: str) -> str:
        return f"{self.prefix}:spot:{spot_id}"


Op = tuple[str, str, str, str | int | float]


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
    #: The event types it shows, and those it leaves out on purpose (none).
    HANDLED: frozenset[str] = frozenset(HANDLERS)
    #: Workflow events that move no dashboard counter.
    NOT_SHOWN: frozenset[str] = frozenset(
        event_type(e) for e in workflows.FAMILY.events
    ) - frozenset(HANDLERS)
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
