"""Seed 003's public and internal API, one resource per noun.

Commands go to the single writer; queries read the read models, after waiting
briefly for them to reach what this process wrote (read-your-writes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol
from uuid import UUID

import falcon
import falcon.asgi

from api import validation as v
from api.errors import answer
from domain.commands import (
    ClaimTasks,
    Command,
    CompleteTask,
    CreateJob,
    FailTask,
    Heartbeat,
    Hello,
    Result,
)
from domain.ids import UnknownIdError, parse_job_id
from domain.sweeps import Range, Sweep, SweepError
from projections.views import PostgresViews, RedisViews, wait_until_applied

MAX_RESULT_JSON = 64 * 1024


class Writer(Protocol):
    async def submit(
        self, command: Command, disconnected: Callable[[], Awaitable[object]] | None = None
    ) -> Result: ...

    def known_versions(self, uuids: Any) -> dict[UUID, int]: ...


class Audit(Protocol):
    def history(self, aggregate: str, entity_id: str) -> list[dict[str, Any]] | None: ...


@dataclass
class ApiContext:
    writer: Writer
    redis: RedisViews
    postgres: PostgresViews
    audit: Audit
    block_ids: Callable[[UUID], list[UUID]]
    max_sweep_tasks: int
    read_wait: float
    spot_ids: Callable[[], list[UUID]]


async def submit(ctx: ApiContext, req: falcon.asgi.Request, command: Command) -> Result:
    """Hand ``command`` to the writer, which drops it if the client leaves while it is queued."""
    return await ctx.writer.submit(command, _disconnected(req))


def _disconnected(req: falcon.asgi.Request) -> Callable[[], Awaitable[object]]:
    """Returns when the client has gone (the ASGI ``http.disconnect`` event).

    Falcon reads the body through the ASGI ``receive``, which it keeps to itself;
    once the body is read, the next event ``receive`` gives is the disconnect.
    """
    receive = req._receive

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _job_uuid(job_id: str) -> UUID:
    try:
        return parse_job_id(job_id)
    except UnknownIdError:
        raise falcon.HTTPNotFound(description="job not found") from None


class Health:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            await self.ctx.postgres.ping()
            counts = await self.ctx.redis.counts()
        except Exception as error:  # the health check reports, it does not fail
            resp.status = falcon.HTTP_503
            resp.media = {"status": "unhealthy", "database": "disconnected", "error": str(error)}
            return
        resp.media = {
            "status": "healthy",
            "database": "connected",
            "activeSpots": counts.get("spots_up", 0),
            "pendingTasks": counts.get("NEW", 0),
            "runningTasks": counts.get("RUNNING", 0),
        }


class Jobs:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        sweep = Sweep(
            jar_path=str(v.text(body, "jarPath")),
            main_class=str(v.text(body, "mainClass")),
            algorithms=tuple(v.strings(body, "algorithms")),
            iterations=_range(body, "iterations"),
            agents=_range(body, "agents"),
            dimension=_range(body, "dimension"),
        )
        try:
            sweep.check(self.ctx.max_sweep_tasks)
        except SweepError as error:
            raise falcon.HTTPBadRequest(description=str(error)) from None
        key = req.get_header("Idempotency-Key")
        if key is not None and not (0 < len(key) <= 255):
            raise falcon.HTTPBadRequest(description="Idempotency-Key must be 1 to 255 characters")
        answer(resp, await submit(self.ctx, req, CreateJob(sweep, key)))

    async def on_get_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, job_id: str
    ) -> None:
        uuid = _job_uuid(job_id)
        await self._wait(self.ctx.redis, uuid)
        job = await self.ctx.redis.job(job_id)
        if job is None:
            raise falcon.HTTPNotFound(description="job not found")
        resp.media = job

    async def on_get_results(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, job_id: str
    ) -> None:
        uuid = _job_uuid(job_id)
        await self._wait(self.ctx.postgres, uuid)
        if await self.ctx.redis.job(job_id) is None:
            raise falcon.HTTPNotFound(description="job not found")
        results = await self.ctx.postgres.results(job_id)
        resp.media = {"jobId": job_id, "totalCompleted": len(results), "results": results}

    async def _wait(self, view: Any, job: UUID) -> None:
        wanted = self.ctx.writer.known_versions([job, *self.ctx.block_ids(job)])
        await wait_until_applied(view, wanted, self.ctx.read_wait)


def _range(body: dict[str, Any], name: str) -> Range:
    spec = v.obj(body, name)
    return Range(
        min=int(v.integer(spec, "min", label=f"{name}.min") or 0),
        max=int(v.integer(spec, "max", label=f"{name}.max") or 0),
        step=int(v.integer(spec, "step", label=f"{name}.step") or 0),
    )


class Spots:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        wanted = self.ctx.writer.known_versions(self.ctx.spot_ids())
        await wait_until_applied(self.ctx.postgres, wanted, self.ctx.read_wait)
        resp.media = {"spots": await self.ctx.postgres.spots()}


class Hellos:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        ip = v.text(body, "ipAddress", max_len=255)
        answer(resp, await submit(self.ctx, req, Hello(str(ip))))


class Heartbeats:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        command = Heartbeat(
            spot_id=str(v.text(body, "spotId", max_len=64)),
            ip_address=v.text(body, "ipAddress", required=False, max_len=255),
            cpu_load=v.number(body, "cpuLoad"),
            running_tasks=v.integer(body, "runningTasks", required=False, low=0),
            total_cores=v.integer(body, "totalCores", required=False, low=0),
        )
        answer(resp, await submit(self.ctx, req, command))


class Claims:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        spot = str(v.text(body, "spotId", max_len=64))
        max_tasks = int(
            v.integer(body, "maxTasks", required=False, low=1, high=100, default=1) or 1
        )
        answer(resp, await submit(self.ctx, req, ClaimTasks(spot, max_tasks)))


class TaskReports:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post_complete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, task_id: str
    ) -> None:
        body = await v.json_body(req)
        command = CompleteTask(
            task_id=task_id,
            spot_id=str(v.text(body, "spotId", max_len=64)),
            fence=v.integer(body, "fenceToken", required=False, low=0),
            runtime_ms=v.integer(body, "runtimeMs", required=False, low=0),
            iter=v.integer(body, "iter", required=False),
            fopt=v.number(body, "fopt"),
            result_json=v.text(body, "resultJson", required=False, max_len=MAX_RESULT_JSON),
        )
        answer(resp, await submit(self.ctx, req, command))

    async def on_post_fail(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, task_id: str
    ) -> None:
        body = await v.json_body(req)
        command = FailTask(
            task_id=task_id,
            spot_id=str(v.text(body, "spotId", max_len=64)),
            fence=v.integer(body, "fenceToken", required=False, low=0),
            error=str(v.text(body, "error", required=False, max_len=8192, default="")),
            retriable=v.boolean(body, "retriable", default=True),
        )
        answer(resp, await submit(self.ctx, req, command), failing=True)


class AuditEvents:
    AGGREGATES = ("job", "task", "spot")

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, aggregate: str, entity_id: str
    ) -> None:
        if aggregate not in self.AGGREGATES:
            raise falcon.HTTPNotFound(
                description=f"unknown aggregate {aggregate!r}: use job, task or spot"
            )
        events = await asyncio.to_thread(self.ctx.audit.history, aggregate, entity_id)
        if events is None:
            raise falcon.HTTPNotFound(description=f"{aggregate} not found")
        resp.media = {"aggregate": aggregate, "id": entity_id, "events": events}
