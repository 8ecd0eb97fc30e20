"""Sagas over HTTP: what clients see of them, and the routes saga runners drive them by.

``GET /api/v1/sagas/{id}`` reads the saga from the event store itself (its events
folded), so it always shows the writer's truth; ``GET /api/v1/sagas?state=``
lists them from the PostgreSQL read model. The ``/internal/v1/sagas/...`` routes
are the saga runners' and participants' (``sagas/``): take a step or a
compensation under a lease, and report it with its fence (the agent key guards
them, as it does the workers').
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import falcon
import falcon.asgi

from api import validation as v
from api.errors import answer
from api.fleet import checked_name
from api.resources import ApiContext, submit
from api.workflows import json_text
from domain.ids import saga_id
from domain.sagas import (
    SAGA_STATES,
    FinishCompensation,
    FinishStep,
    Saga,
    TakeCompensation,
    TakeStep,
)
from domain.sagas.definitions import AGENT_SPAWNING, MAX_STEP_TIMEOUT_SECONDS, MESH_FORMATION


def saga_view(saga: Saga) -> dict[str, Any]:
    return {"sagaId": saga_id(saga.id), "version": saga.version, **saga.view()}


class Sagas:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get_one(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, saga: UUID
    ) -> None:
        found = await asyncio.to_thread(self.ctx.audit.load, saga)
        if not isinstance(found, Saga):
            raise falcon.HTTPNotFound(description="saga not found")
        resp.media = saga_view(found)

    async def on_get(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        given = req.get_param_as_list("state", default=[])
        states = [s.strip().upper() for value in given for s in value.split(",") if s.strip()]
        unknown = [s for s in states if s not in SAGA_STATES]
        if unknown:
            raise falcon.HTTPBadRequest(
                description=f"state must be among {', '.join(SAGA_STATES)}; not {', '.join(unknown)}"
            )
        kind = req.get_param("kind")
        if kind is not None and kind not in (AGENT_SPAWNING, MESH_FORMATION):
            raise falcon.HTTPBadRequest(
                description=f"kind must be {AGENT_SPAWNING} or {MESH_FORMATION}"
            )
        limit = req.get_param_as_int("limit", min_value=1, max_value=1000, default=100)
        sagas = await self.ctx.postgres.sagas(states, kind, limit)
        resp.media = {"sagas": sagas, "count": len(sagas)}


def _driver(body: dict[str, Any]) -> str:
    return str(v.text(body, "driver", max_len=128))


def _step(value: str, what: str = "step") -> str:
    return checked_name(value, what)


def _outcome(body: dict[str, Any]) -> tuple[bool, Any, str]:
    ok = v.boolean(body, "ok", True)
    outcome = body.get("outcome")
    if outcome is not None:
        json_text(outcome, "outcome")  # refused past the cap
    error = v.text(body, "error", required=not ok, max_len=4096, default="") or ""
    return ok, outcome, error


class SagaSteps:
    """The saga runners' routes (see the module docstring)."""

    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post_take(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, saga: UUID
    ) -> None:
        body = await v.json_body(req)
        step = v.text(body, "step", required=False, max_len=64)
        after = v.text(body, "after", required=False, max_len=64)
        compensation = v.text(body, "compensation", required=False, max_len=64)
        timeout_ms = v.integer(
            body, "timeoutMs", required=False, low=1, high=int(MAX_STEP_TIMEOUT_SECONDS * 1000)
        )
        command = TakeStep(
            saga,
            _driver(body),
            _step(step) if step is not None else None,
            _step(after, "after") if after is not None else None,
            timeout_ms / 1000 if timeout_ms is not None else None,
            _step(compensation, "compensation") if compensation is not None else None,
        )
        answer(resp, await submit(self.ctx, req, command))

    async def on_post_finish(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, saga: UUID, step: str
    ) -> None:
        body = await v.json_body(req)
        ok, outcome, error = _outcome(body)
        command = FinishStep(
            saga,
            _step(step),
            _driver(body),
            int(v.integer(body, "fenceToken", low=1) or 0),
            ok,
            outcome,
            error,
            v.boolean(body, "apply", False),
            v.boolean(body, "final", False),
            v.boolean(body, "takeNext", False),
        )
        answer(resp, await submit(self.ctx, req, command))

    async def on_post_take_compensation(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, saga: UUID
    ) -> None:
        body = await v.json_body(req)
        step = v.text(body, "step", required=False, max_len=64)
        command = TakeCompensation(saga, _driver(body), _step(step) if step is not None else None)
        answer(resp, await submit(self.ctx, req, command))

    async def on_post_finish_compensation(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, saga: UUID, step: str
    ) -> None:
        body = await v.json_body(req)
        ok, outcome, error = _outcome(body)
        command = FinishCompensation(
            saga,
            _step(step),
            _driver(body),
            int(v.integer(body, "fenceToken", low=1) or 0),
            ok,
            outcome,
            error,
            v.boolean(body, "apply", False),
            v.boolean(body, "takeNext", False),
        )
        answer(resp, await submit(self.ctx, req, command))
