"""Targets, contexts, agents and meshes over HTTP (seeds 000 and 001).

Commands go to the single writer; queries read the PostgreSQL read model, after
waiting (up to ``read_wait``) for it to have applied what this API wrote of the
entity asked for. Spawning an agent and forming a mesh start sagas
(:mod:`api.sagas` shows them); seed 000's own REST (``/v1/targets/{id}/status``,
``/v1/scheduler/...``) answers in seed 000's shapes exactly.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any
from uuid import UUID, uuid4, uuid5

import falcon
import falcon.asgi

from api import validation as v
from api.errors import answer
from api.resources import ApiContext, submit
from api.workflows import json_text
from domain.agents import EvolveAgentCapabilities, TerminateAgent, UpdateAgentPerformance
from domain.contexts import ModifyContext
from domain.ids import (
    NAME,
    agent_id,
    context_uuid,
    mesh_id,
    parse_mesh_id,
    saga_for_key,
    target_uuid,
)
from domain.meshes import TOPOLOGIES, DissolveMesh, ImproveMeshPerformance, LeaveMesh
from domain.sagas import AGENT_SPAWNING, MESH_FORMATION, StartMeshFormation, StartSpawn
from domain.system import SEED_NAMES, RecordSystemEvent
from domain.targets import TARGET_STATES, Limits, UpdateTarget
from projections.views import CONNECTED, wait_until_applied

UINT32_MAX = 2**32 - 1
#: seed 000's ``current_workloads`` is an ``INT``: a target may hold at most this many.
INT32_MAX = 2**31 - 1
#: The largest mesh.
MAX_MESH_MEMBERS = 10_000


def checked_name(value: str, what: str) -> str:
    v.scalar_fits(value, f"{what}Id")
    if not NAME.fullmatch(value):
        raise falcon.HTTPBadRequest(
            description=f"{what}Id must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        )
    return value


async def _fresh(ctx: ApiContext, uuid: UUID) -> None:
    """Wait until the read model has what this API wrote of ``uuid`` (bounded)."""
    await wait_until_applied(ctx.postgres, ctx.writer.known_versions([uuid]), ctx.read_wait)


def _found(value: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if value is None:
        raise falcon.HTTPNotFound(description=f"{what} not found")
    return value


def _resources(body: dict[str, Any], *, workloads: bool) -> dict[str, int]:
    section = v.section(body, "resources")
    found = {
        "cpu_millicores": v.integer(
            section, "cpu_millicores", low=0, high=UINT32_MAX, label="resources.cpu_millicores"
        ),
        "memory_bytes": v.integer(
            section, "memory_bytes", low=0, high=v.INT64_MAX, label="resources.memory_bytes"
        ),
    }
    if workloads:
        found["max_workloads"] = v.integer(
            section, "max_workloads", low=0, high=INT32_MAX, label="resources.max_workloads"
        )
    return {k: int(x) for k, x in found.items() if x is not None}


# ---- targets and contexts (seed 000) ------------------------------------------------------


class Targets:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_put(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, target_id: str
    ) -> None:
        """Seed 000's UpdateTarget: creates the target the first time."""
        name = checked_name(target_id, "target")
        body = await v.json_body(req)
        state = v.text(body, "state", max_len=32)
        if state not in TARGET_STATES:
            raise falcon.HTTPBadRequest(
                description=f"state must be one of {', '.join(TARGET_STATES)}"
            )
        resources = _resources(body, workloads=True)
        limits = Limits(
            resources["cpu_millicores"], resources["memory_bytes"], resources["max_workloads"]
        )
        command = UpdateTarget(name, state, v.string_map(body, "capabilities"), limits)
        answer(resp, await submit(self.ctx, req, command))

    async def on_get_status(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, target_id: str
    ) -> None:
        """Seed 000's ``GET /v1/targets/{targetId}/status``: TargetStatus."""
        name = checked_name(target_id, "target")
        await _fresh(self.ctx, target_uuid(name))
        resp.media = _found(await self.ctx.postgres.target_status(name), "target")


class Contexts:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_put(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, context_id: str
    ) -> None:
        """Seed 000's ModifyContext: its hierarchies and properties become these."""
        name = checked_name(context_id, "context")
        body = await v.json_body(req)
        command = ModifyContext(
            name, tuple(v.name_list(body, "hierarchies")), v.string_map(body, "properties")
        )
        answer(resp, await submit(self.ctx, req, command))

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, context_id: str
    ) -> None:
        name = checked_name(context_id, "context")
        await _fresh(self.ctx, context_uuid(name))
        resp.media = _found(await self.ctx.postgres.context(name), "context")


# ---- agents and meshes (seed 001) ---------------------------------------------------------


def _saga_uuid(req: falcon.asgi.Request, kind: str) -> UUID:
    """From ``Idempotency-Key`` (a retry starts nothing new), else a new one."""
    key = v.header(req, "Idempotency-Key", max_len=255)
    return saga_for_key(kind, key) if key is not None else uuid4()


class Agents:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post_spawn(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        """Starts an agent-spawning saga (202). A spawn the target or the mesh cannot take
        is not refused here: its saga fails at the step that finds out, and compensates."""
        body = await v.json_body(req)
        target = checked_name(str(v.text(body, "targetId", max_len=64)), "target")
        mesh_text = v.text(body, "meshId", required=False, max_len=64)
        try:
            mesh = parse_mesh_id(mesh_text) if mesh_text is not None else None
        except LookupError:
            raise falcon.HTTPBadRequest(
                description="meshId is not a mesh id (mesh-<32 hex>)"
            ) from None
        resources = _resources(body, workloads=False)
        saga = _saga_uuid(req, AGENT_SPAWNING)
        agent = uuid5(saga, "agent")  # the same for a retried start
        command = StartSpawn(
            saga,
            agent,
            target,
            mesh,
            v.string_map(body, "capabilities"),
            resources["cpu_millicores"],
            resources["memory_bytes"],
        )
        answer(resp, await submit(self.ctx, req, command))

    async def on_get_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent: UUID
    ) -> None:
        await _fresh(self.ctx, agent)
        resp.media = _found(await self.ctx.postgres.agent(agent_id(agent)), "agent")

    async def on_delete_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent: UUID
    ) -> None:
        """Terminates the agent: it leaves its mesh and gives its target's resources back."""
        answer(resp, await submit(self.ctx, req, TerminateAgent(agent, "terminated by a client")))

    async def on_post_performance(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent: UUID
    ) -> None:
        body = await v.json_body(req)
        command = UpdateAgentPerformance(agent, v.number_map(body, "metrics"))
        answer(resp, await submit(self.ctx, req, command))

    async def on_put_capabilities(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, agent: UUID
    ) -> None:
        body = await v.json_body(req)
        capabilities = v.string_map(body, "capabilities", required=True)
        answer(resp, await submit(self.ctx, req, EvolveAgentCapabilities(agent, capabilities)))


class Meshes:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        """Starts a mesh-formation saga (202); the mesh exists once it has succeeded."""
        body = await v.json_body(req)
        topology = v.text(body, "topology", max_len=32)
        if topology not in TOPOLOGIES:
            raise falcon.HTTPBadRequest(
                description=f"topology must be one of {', '.join(TOPOLOGIES)}"
            )
        low = int(
            v.integer(body, "minMembers", low=0, high=MAX_MESH_MEMBERS, default=0, required=False)
            or 0
        )
        high = int(
            v.integer(
                body,
                "maxMembers",
                low=1,
                high=MAX_MESH_MEMBERS,
                required=False,
                default=MAX_MESH_MEMBERS,
            )
            or MAX_MESH_MEMBERS
        )
        if low > high:
            raise falcon.HTTPBadRequest(
                description=f"minMembers ({low}) is above maxMembers ({high})"
            )
        saga = _saga_uuid(req, MESH_FORMATION)
        mesh = uuid5(saga, "mesh")  # the same for a retried start
        command = StartMeshFormation(
            saga, mesh, str(topology), v.string_map(body, "requiredCapabilities"), low, high
        )
        answer(resp, await submit(self.ctx, req, command))

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        state = req.get_param("state")
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=100)
        meshes = await self.ctx.postgres.meshes(state.upper() if state else None, limit)
        resp.media = {"meshes": meshes, "count": len(meshes)}

    async def on_get_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, mesh: UUID
    ) -> None:
        await _fresh(self.ctx, mesh)
        resp.media = _found(await self.ctx.postgres.mesh(mesh_id(mesh)), "mesh")

    async def on_delete_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, mesh: UUID
    ) -> None:
        """Dissolves the mesh: every member leaves it."""
        answer(resp, await submit(self.ctx, req, DissolveMesh(mesh, "dissolved by a client")))

    async def on_post_performance(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, mesh: UUID
    ) -> None:
        body = await v.json_body(req)
        command = ImproveMeshPerformance(mesh, v.number_map(body, "metrics"))
        answer(resp, await submit(self.ctx, req, command))

    async def on_delete_member(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, mesh: UUID, agent: UUID
    ) -> None:
        """The agent leaves (refused if that takes an ACTIVE mesh below its minimum)."""
        answer(resp, await submit(self.ctx, req, LeaveMesh(mesh, agent)))


# ---- seed 000's scheduler REST -------------------------------------------------------------


class Scheduler:
    """``GET /v1/scheduler/health`` and ``/v1/scheduler/metrics`` in seed 000's shapes.

    Figures come from the same counts as health (Redis, or the PostgreSQL read model
    while Redis is away), so their cost does not grow with history:
    ``jobs_per_second`` is tasks finished (DONE or FAILED) per second since the
    previous metrics request (0 for the first, or after a minute without one);
    ``avg_latency_ms`` is the mean time from an event stored to the read models
    having it (the latest 1,000 events); ``error_rate`` is FAILED over finished
    tasks; ``active_targets`` the READY targets.
    """

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx
        self._last: tuple[float, int] | None = None

    async def _counts(self) -> dict[str, int]:
        if await self.ctx.redis.state() == CONNECTED:
            with contextlib.suppress(Exception):  # gone just now: PostgreSQL has them too
                return await self.ctx.redis.counts()
        return await self.ctx.postgres.counts()

    async def on_get_health(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        try:
            await self.ctx.postgres.ping()
            counts = await self._counts()
        except Exception:  # seed 000 says UNHEALTHY; the figures are unknown
            resp.status = falcon.HTTP_503
            resp.media = {
                "status": "UNHEALTHY",
                "queue_depth": 0,
                "active_workers": 0,
                "error_rate": 0.0,
            }
            return
        finished = counts.get("DONE", 0) + counts.get("FAILED", 0)
        queued, workers = counts.get("NEW", 0), counts.get("spots_up", 0)
        resp.media = {
            "status": "DEGRADED" if queued and not workers else "HEALTHY",
            "queue_depth": queued,
            "active_workers": workers,
            "error_rate": counts.get("FAILED", 0) / finished if finished else 0.0,
        }

    async def on_get_metrics(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        counts = await self._counts()
        fleet = await self.ctx.postgres.fleet_counts()
        finished = counts.get("DONE", 0) + counts.get("FAILED", 0)
        now, rate = time.monotonic(), 0.0
        if self._last is not None and 0 < now - self._last[0] <= 60:
            rate = max(0, finished - self._last[1]) / (now - self._last[0])
        self._last = (now, finished)
        latency = 0.0
        with contextlib.suppress(Exception):  # a figure, not a reason to fail
            latency = await self.ctx.redis.read_model_lag_ms()
        resp.media = {
            "jobs_per_second": round(rate),
            "avg_latency_ms": round(latency, 3),
            "queue_depth": counts.get("NEW", 0),
            "error_count": counts.get("FAILED", 0),
            "active_targets": fleet.get("targets", {}).get("READY", 0),
        }


class SystemEvents:
    """``POST /api/v1/system/events``: record one of seed 001's system events."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        kind = v.text(body, "type", max_len=64)
        if kind not in SEED_NAMES:
            raise falcon.HTTPBadRequest(description=f"type must be one of {', '.join(SEED_NAMES)}")
        detail = body.get("detail", {})
        if not isinstance(detail, dict):
            raise falcon.HTTPBadRequest(description="detail must be a JSON object")
        json_text(detail, "detail")  # refused past the cap
        reason = str(v.text(body, "reason", max_len=1024))
        answer(resp, await submit(self.ctx, req, RecordSystemEvent(str(kind), reason, detail)))
        resp.status = falcon.HTTP_201
