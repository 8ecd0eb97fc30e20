"""Seed 003's public and internal API, one resource per noun.

Commands go to the single writer; queries read the read models, after waiting
briefly for them to reach what this process wrote (read-your-writes).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import falcon
import falcon.asgi
import orjson
import redis.asyncio as aioredis

from api import validation as v
from api.errors import answer, answer_with_claim
from domain.family import Command, Result
from domain.ids import job_id as public_job_id
from domain.jobs import CompleteTask, CreateJob, FailTask
from domain.jobs.sweeps import Range, Sweep, SweepError
from domain.spots import Claimed, ClaimTasks, Heartbeat, Hello
from domain.workflows import CompleteWorkflowTask, FailWorkflowTask, RenewLease
from domain.workflows.ids import WORKFLOW_TASK_PREFIX
from projections.views import CONNECTED, wait_until_applied

MAX_RESULT_JSON = 64 * 1024


class Writer(Protocol):
    async def submit(
        self, command: Command, disconnected: Callable[[], Awaitable[object]] | None = None
    ) -> Result: ...

    def known_versions(self, uuids: Any) -> dict[UUID, int]: ...

    @property
    def ready(self) -> bool:
        """Recovered from the store, and its last store operation went through."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a claim may find a task (this waiter's turn), or after ``timeout`` s."""
        ...


class FastViews(Protocol):
    """The fast read model (``projections.views.RedisViews``): job progress and counts."""

    async def state(self) -> str:
        """``connected``, ``rebuilding`` or ``disconnected``."""
        ...

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]: ...

    async def job(self, job_id: str) -> dict[str, Any] | None: ...

    async def counts(self) -> dict[str, int]: ...

    async def read_model_lag_ms(self) -> float:
        """Mean event-stored → read-model-applied time of the latest events (ms)."""

    async def workflow_runs(self) -> dict[str, int]:
        """Workflow runs by state."""
        ...


class TableViews(Protocol):
    """The PostgreSQL read model (``projections.views.PostgresViews``)."""

    async def ping(self) -> bool: ...

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]: ...

    async def job(self, job_id: str) -> dict[str, Any] | None: ...

    async def counts(self) -> dict[str, int]: ...

    async def results(self, job_id: str) -> list[dict[str, Any]]: ...

    async def spots(self) -> list[dict[str, Any]]: ...

    async def target_status(self, target_id: str) -> dict[str, Any] | None:
        """Seed 000's TargetStatus."""

    async def context(self, context_id: str) -> dict[str, Any] | None: ...

    async def agent(self, agent_id: str) -> dict[str, Any] | None: ...

    async def meshes(self, state: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def mesh(self, mesh_id: str) -> dict[str, Any] | None: ...

    async def sagas(self, states: list[str], kind: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first."""

    async def fleet_counts(self) -> dict[str, Any]:
        """Targets, agents, meshes and sagas by state."""


class Stage(Protocol):
    """One pipeline step as health shows it (``streaming.health.StageStatus``)."""

    @property
    def name(self) -> str: ...

    @property
    def behind_seconds(self) -> float: ...

    @property
    def dead_letters(self) -> int: ...

    def lagging(self, limit: float) -> bool: ...

    def as_json(self) -> dict[str, Any]: ...


class Pipeline(Protocol):
    def stages(self, now: datetime) -> tuple[int, Sequence[Stage]]:
        """The store's last position and each step's status (blocking: run in a thread)."""
        ...


class Audit(Protocol):
    @property
    def entities(self) -> tuple[str, ...]:
        """The entity names the audit API serves (``job``, ``task``, ``spot``...)."""
        ...

    def history(self, aggregate: str, entity_id: str) -> list[dict[str, Any]] | None: ...

    def load(self, uuid: UUID) -> Any:
        """An aggregate as its stored events make it (blocking: run in a thread)."""
        ...


@dataclass
class ApiContext:
    writer: Writer
    redis: FastViews
    postgres: TableViews
    audit: Audit
    block_ids: Callable[[UUID], list[UUID]]
    max_sweep_tasks: int
    read_wait: float
    spot_ids: Callable[[], list[UUID]]
    max_sweep_bytes: int = 262_144
    #: How far behind each pipeline step is; None: not shown (an API without one).
    pipeline: Pipeline | None = None
    #: Whether the broker answers (blocking); None: not shown.
    broker_up: Callable[[], bool] | None = None
    #: Seconds a step may be behind, with events waiting, before health is degraded.
    degraded_lag: float = 10.0
    #: Raises unless the event store answers.
    store_ping: Callable[[], Awaitable[None]] | None = None


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


#: Longest a health check waits for the pipeline's figures (s).
HEALTH_WAIT = 2.0


class Health:
    """Seed 003's health, plus Redis, the broker and how far each pipeline step is behind.

    ``unhealthy`` (503) when PostgreSQL does not answer; ``degraded`` while Redis
    or the broker is away, a step is more than ``degraded_lag`` seconds behind
    with events waiting, or a step holds dead letters; ``healthy`` otherwise.
    """

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self._reading: asyncio.Future[tuple[int, Sequence[Stage]]] | None = None

    async def _pipeline(self, pipeline: Pipeline) -> tuple[int, Sequence[Stage]]:
        """The pipeline's figures, read by one thread at a time however often health is
        asked (a store that hangs must not take every worker thread and connection)."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(
                asyncio.to_thread(pipeline.stages, datetime.now(UTC))
            )
        return await asyncio.wait_for(asyncio.shield(self._reading), HEALTH_WAIT)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        ctx = self.ctx
        redis = await ctx.redis.state()
        try:
            await ctx.postgres.ping()
        except Exception as error:  # the health check reports, it does not fail
            resp.status = falcon.HTTP_503
            resp.media = {
                "status": "unhealthy",
                "database": "disconnected",
                "redis": redis,
                "error": str(error),
            }
            return
        problems = [] if redis == CONNECTED else [f"redis is {redis}"]
        try:
            counts = await (ctx.redis if redis == CONNECTED else ctx.postgres).counts()
        except Exception as error:  # reported, as everything else here
            counts = {}
            problems.append(f"the task counts are unavailable: {error}")
        body: dict[str, Any] = {
            "status": "healthy",
            "database": "connected",
            "activeSpots": counts.get("spots_up", 0),
            "pendingTasks": counts.get("NEW", 0),
            "runningTasks": counts.get("RUNNING", 0),
            "redis": redis,
        }
        if redis == CONNECTED:
            with contextlib.suppress(Exception):  # a dashboard figure, not a health signal
                body["workflowRuns"] = await ctx.redis.workflow_runs()
        if ctx.broker_up is not None:
            up = await asyncio.to_thread(ctx.broker_up)
            body["broker"] = "connected" if up else "down"
            if not up:
                problems.append("the broker is down")
        if ctx.pipeline is not None:
            try:
                last, stages = await self._pipeline(ctx.pipeline)
            except Exception as error:  # reported, as everything else here
                last, stages = -1, []
                problems.append(f"the pipeline's figures are unavailable: {error!r}")
            body["storePosition"] = last
            body["pipeline"] = {stage.name: stage.as_json() for stage in stages}
            for stage in stages:
                if stage.lagging(ctx.degraded_lag):
                    problems.append(f"{stage.name} is {stage.behind_seconds:g}s behind")
                if stage.dead_letters:
                    problems.append(f"{stage.name} holds {stage.dead_letters} dead letters")
        if problems:
            body["status"] = "degraded"
            body["problems"] = problems
        resp.media = body


class Ready:
    """``GET /ready`` for probes: 200 once the store answers and the writer has recovered."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        problems: list[str] = []
        if self.ctx.store_ping is not None:
            try:
                await self.ctx.store_ping()
            except Exception as error:  # a probe reports, it does not fail
                problems.append(f"the event store does not answer: {error}")
        if not self.ctx.writer.ready:
            problems.append("the writer has not recovered its state from the store yet")
        if problems:
            resp.status = falcon.HTTP_503
            resp.media = {"ready": False, "problems": problems}
        else:
            resp.media = {"ready": True}


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
            sweep.check(self.ctx.max_sweep_tasks, self.ctx.max_sweep_bytes)
        except SweepError as error:
            raise falcon.HTTPBadRequest(description=str(error)) from None
        key = v.header(req, "Idempotency-Key", max_len=255)
        answer(resp, await submit(self.ctx, req, CreateJob(sweep, key)))

    async def on_get_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, job: UUID
    ) -> None:
        """From Redis; from the PostgreSQL read model while Redis is away or rebuilding."""
        uuid, job_id = job, public_job_id(job)
        found = None
        if await self.ctx.redis.state() == CONNECTED:
            try:
                await self._wait(self.ctx.redis, uuid, resp)
                found = await self.ctx.redis.job(job_id)
            except aioredis.RedisError:  # went away just now: PostgreSQL has it too
                found = None
        if found is None:
            await self._wait(self.ctx.postgres, uuid, resp)
            found = await self.ctx.postgres.job(job_id)
        if found is None:
            raise falcon.HTTPNotFound(description="job not found")
        resp.media = found

    async def on_get_results(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, job: UUID
    ) -> None:
        uuid, job_id = job, public_job_id(job)
        await self._wait(self.ctx.postgres, uuid, resp)
        if await self.ctx.postgres.job(job_id) is None:
            raise falcon.HTTPNotFound(description="job not found")
        results = await self.ctx.postgres.results(job_id)
        resp.media = {"jobId": job_id, "totalCompleted": len(results), "results": results}

    async def _wait(self, view: Any, job: UUID, resp: falcon.asgi.Response) -> None:
        wanted = self.ctx.writer.known_versions([job, *self.ctx.block_ids(job)])
        _say_if_stale(resp, await wait_until_applied(view, wanted, self.ctx.read_wait))


def _say_if_stale(resp: falcon.asgi.Response, behind: int) -> None:
    """A query that gave up waiting answers what it has, and says how far behind it is.

    ``behind`` is the number of versions the read model still lacks on the
    aggregates the query needed (0: caught up, and no header at all).
    """
    if behind:
        resp.set_header("X-Tadpole-Stale", "true")
        resp.set_header("X-Tadpole-Stale-Events", str(behind))


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
        _say_if_stale(resp, await wait_until_applied(self.ctx.postgres, wanted, self.ctx.read_wait))
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
    """``POST /internal/v1/tasks/claim``; with ``waitMs``, a long poll for the next task."""

    #: Longest a claim may wait for a task (seed 002's workers poll; this lets them wait).
    MAX_WAIT_MS = 30_000

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        spot = str(v.text(body, "spotId", max_len=64))
        max_tasks = int(
            v.integer(body, "maxTasks", required=False, low=1, high=100, default=1) or 1
        )
        wait_ms = int(
            v.integer(body, "waitMs", required=False, low=0, high=self.MAX_WAIT_MS, default=0) or 0
        )
        if not wait_ms:
            answer(resp, await submit(self.ctx, req, ClaimTasks(spot, max_tasks)))
            return
        # One watcher of the client for the whole long poll (two readers of the ASGI
        # receive could not both see the disconnect): a client that hung up while it
        # waited is never handed a task it will not get.
        gone = asyncio.ensure_future(_disconnected(req)())
        try:
            result = await self._long_poll(spot, max_tasks, wait_ms, gone)
        finally:
            gone.cancel()
        answer(resp, result)

    async def _long_poll(
        self, spot: str, max_tasks: int, wait_ms: int, gone: asyncio.Future[object]
    ) -> Result:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000

        async def disconnected() -> None:
            await asyncio.shield(gone)

        while True:
            result = await self.ctx.writer.submit(ClaimTasks(spot, max_tasks), disconnected)
            remaining = deadline - loop.time()
            if not isinstance(result, Claimed) or result.tasks or remaining <= 0:
                return result
            # Nothing yet: wait until the writer sees a task for this claim, then claim.
            waiting = asyncio.ensure_future(self.ctx.writer.wait_for_work(remaining))
            await asyncio.wait(
                [waiting, asyncio.ensure_future(disconnected())],
                return_when=asyncio.FIRST_COMPLETED,
            )
            waiting.cancel()
            if gone.done():
                raise falcon.HTTPBadRequest(description="the client went away")


class TaskReports:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post_complete(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, task_id: str
    ) -> None:
        body = await v.json_body(req)
        spot = str(v.text(body, "spotId", max_len=64))
        fence = v.integer(body, "fenceToken", required=False, low=0)
        result_json = v.text(body, "resultJson", required=False, max_len=MAX_RESULT_JSON)
        command: Command
        if task_id.startswith(WORKFLOW_TASK_PREFIX):
            command = CompleteWorkflowTask(
                task_id, spot, fence, _workflow_output(body, result_json)
            )
        else:
            command = CompleteTask(
                task_id=task_id,
                spot_id=spot,
                fence=fence,
                runtime_ms=v.integer(body, "runtimeMs", required=False, low=0),
                iter=v.integer(body, "iter", required=False),
                fopt=v.number(body, "fopt"),
                result_json=result_json,
            )
        await self._report(req, resp, body, spot, command)

    async def on_post_fail(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, task_id: str
    ) -> None:
        body = await v.json_body(req)
        spot = str(v.text(body, "spotId", max_len=64))
        fence = v.integer(body, "fenceToken", required=False, low=0)
        error = str(v.text(body, "error", required=False, max_len=8192, default=""))
        retriable = v.boolean(body, "retriable", default=True)
        kind = FailWorkflowTask if task_id.startswith(WORKFLOW_TASK_PREFIX) else FailTask
        await self._report(
            req, resp, body, spot, kind(task_id, spot, fence, error, retriable), failing=True
        )

    async def _report(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        body: dict[str, Any],
        spot: str,
        command: Command,
        failing: bool = False,
    ) -> None:
        """Decide a report; with ``claimNext`` (1-100), also a claim of that many tasks for
        the same spot, in the same batch: the next step a completion made claimable is
        in the answer, with no claim round trip. The claim stands whatever the report's
        answer, so its tasks are in every answer (``tasks``; ``claimError`` if refused)."""
        claim_next = int(v.integer(body, "claimNext", required=False, low=0, high=100) or 0)
        if not claim_next:
            answer(resp, await submit(self.ctx, req, command), failing=failing)
            return
        gone = asyncio.ensure_future(_disconnected(req)())  # one reader of the ASGI receive

        async def disconnected() -> None:
            await asyncio.shield(gone)

        try:
            report, claim = await asyncio.gather(
                self.ctx.writer.submit(command, disconnected),
                self.ctx.writer.submit(ClaimTasks(spot, claim_next), disconnected),
                return_exceptions=True,
            )
        finally:
            gone.cancel()
        answer_with_claim(resp, report, claim, failing=failing)

    async def on_post_renew(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, task_id: str
    ) -> None:
        """Extend a workflow task's lease; 409 once it is lost (another fence, or ended)."""
        body = await v.json_body(req)
        spot = str(v.text(body, "spotId", max_len=64))
        fence = int(v.integer(body, "fenceToken", low=0) or 0)
        if not task_id.startswith(WORKFLOW_TASK_PREFIX):
            raise falcon.HTTPConflict(description="only a workflow task has a lease to renew")
        answer(resp, await submit(self.ctx, req, RenewLease(task_id, spot, fence)))


def _workflow_output(body: dict[str, Any], result_json: str | None) -> str:
    """A workflow task's output: ``output`` (a JSON object) or seed 003's ``resultJson``."""
    output = body.get("output")
    if output is None and result_json is not None:
        try:
            output = orjson.loads(result_json)
        except orjson.JSONDecodeError:
            raise falcon.HTTPBadRequest(description="resultJson is not JSON") from None
    if output is None:
        output = {}
    if not isinstance(output, dict):
        raise falcon.HTTPBadRequest(description="output must be a JSON object")
    text = orjson.dumps(output).decode()
    if len(text) > MAX_RESULT_JSON:
        raise falcon.HTTPBadRequest(description=f"output is above {MAX_RESULT_JSON} bytes")
    return text


class AuditEvents:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, aggregate: str, entity_id: str
    ) -> None:
        entities = self.ctx.audit.entities
        if aggregate not in entities:
            raise falcon.HTTPNotFound(
                description=f"unknown aggregate {aggregate!r}: use {', '.join(entities[:-1])} or {entities[-1]}"
            )
        events = await asyncio.to_thread(self.ctx.audit.history, aggregate, entity_id)
        if events is None:
            raise falcon.HTTPNotFound(description=f"{aggregate} not found")
        resp.media = {"aggregate": aggregate, "id": entity_id, "events": events}
