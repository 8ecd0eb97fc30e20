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
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis

from domain.ids import job_id, spot_id
from domain.spots import DOWN, UP
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

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def spot(self, spot_id: str) -> str:
        return f"{self.prefix}:spot:{spot_id}"


Op = tuple[str, str, str, str | int | float]


def ops_for(keys: RedisKeys, m: EventMessage) -> list[Op]:
    """The changes one event makes to the dashboards."""
    d = m.data
    c = keys.counts
    if m.type == "Job.Created":
        job = keys.job(job_id(m.aggregate_id))
        return [
            ("HSET", job, "total", d["total_tasks"]),
            ("HSET", job, "created_at", m.timestamp.isoformat()),
            ("HINCRBY", job, job_field(DONE), 0),
        ]
    if m.type.startswith("TaskBlock."):
        job = keys.job(d["job_id"])
        if m.type == "TaskBlock.Created":
            return _moves(c, job, {NEW: d["count"]})
        n = len(d["indexes"])
        if m.type == "TaskBlock.Claimed":
            return _moves(c, job, {NEW: -n, RUNNING: n})
        if m.type == "TaskBlock.Completed":
            return _moves(c, job, {RUNNING: -n, DONE: n})
        retried = sum(1 for r in d["retried"] if r)
        return _moves(c, job, {RUNNING: -n, NEW: retried, FAILED: n - retried})
    spot = keys.spot(spot_id(m.aggregate_id))
    if m.type == "Spot.Registered":
        at = m.data["at"]
        return [
            ("HSET", spot, "ipAddress", d["ip_address"]),
            ("HSET", spot, "status", UP),
            ("HSET", spot, "lastHeartbeat", at.isoformat()),
            ("HINCRBY", c, "spots_up", 1),
        ]
    if m.type == "Spot.HeartbeatRecorded":
        return [
            ("HSET", spot, "ipAddress", d["ip_address"]),
            ("HSET", spot, "cpuLoad", d["cpu_load"]),
            ("HSET", spot, "runningTasks", d["running_tasks"]),
            ("HSET", spot, "totalCores", d["total_cores"]),
            ("HSET", spot, "lastHeartbeat", d["at"].isoformat()),
        ]
    if m.type == "Spot.MarkedDown":
        return [("HSET", spot, "status", DOWN), ("HINCRBY", c, "spots_up", -1)]
    if m.type == "Spot.CameUp":
        return [("HSET", spot, "status", UP), ("HINCRBY", c, "spots_up", 1)]
    return []


def job_field(state: str) -> str:
    """The field of a job's hash that counts its tasks in ``state`` (``done``...)."""
    return state.lower()


def _moves(counts: str, job: str, moves: dict[str, int]) -> list[Op]:
    ops: list[Op] = []
    for state, n in moves.items():
        if n:
            ops.append(("HINCRBY", counts, state, n))
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
            args: list[Any] = [str(m.aggregate_id), m.version]
            for op in ops_for(self.keys, m):
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
