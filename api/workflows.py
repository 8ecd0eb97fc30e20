"""Seed 002's workflows over HTTP: definitions, runs and their control.

Commands go to the single writer as everywhere. ``GET /api/v1/workflow-runs/{id}``
reads the run from the event store itself (its events folded into the run, as
the audit API reads history) until the workflows' read models exist.
"""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

import falcon
import falcon.asgi
import orjson

from api import validation as v
from api.errors import answer
from api.resources import ApiContext, submit
from domain.workflows import (
    CancelRun,
    CompensateRun,
    Definition,
    DefinitionError,
    PauseRun,
    RegisterWorkflow,
    ResumeRun,
    RetryWorkflowTask,
    StartRun,
    WorkflowRun,
)
from domain.workflows.ids import workflow_task_id

#: The largest definition, in bytes of canonical JSON (stored in every run's first event).
MAX_DEFINITION_BYTES = 256 * 1024
#: The largest run input, task output or retry input, in bytes of JSON.
MAX_VALUE_BYTES = 64 * 1024


def json_text(value: Any, name: str) -> str:
    """``value`` as compact JSON text, refused (400) past :data:`MAX_VALUE_BYTES`."""
    text = orjson.dumps(value).decode()
    if len(text) > MAX_VALUE_BYTES:
        raise falcon.HTTPBadRequest(
            description=f"{name} is {len(text)} bytes as JSON, above the cap of {MAX_VALUE_BYTES}"
        )
    return text


class Workflows:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        body = await v.json_body(req)
        try:
            definition = Definition.from_dict(body)
            definition.check()
        except DefinitionError as error:
            raise falcon.HTTPUnprocessableEntity(description=str(error)) from None
        size = len(definition.to_json())
        if size > MAX_DEFINITION_BYTES:
            raise falcon.HTTPUnprocessableEntity(
                description=f"the definition is {size} bytes, above the cap of "
                f"{MAX_DEFINITION_BYTES}"
            )
        answer(resp, await submit(self.ctx, req, RegisterWorkflow(definition)))

    async def on_post_runs(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, namespace: str, name: str
    ) -> None:
        body = await v.json_body(req)
        run_id = str(v.text(body, "runId", max_len=512))
        given = body.get("input", {})
        if not isinstance(given, dict):
            raise falcon.HTTPBadRequest(description="input must be a JSON object")
        command = StartRun(namespace, name, run_id, json_text(given, "input"))
        answer(resp, await submit(self.ctx, req, command))


class WorkflowRuns:
    def __init__(self, ctx: ApiContext):
        self.ctx = ctx

    async def on_get(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance: UUID
    ) -> None:
        run = await asyncio.to_thread(self.ctx.audit.load, instance)
        if not isinstance(run, WorkflowRun):
            raise falcon.HTTPNotFound(description="workflow run not found")
        resp.media = run_view(run)

    async def _control(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, command: Any
    ) -> None:
        answer(resp, await submit(self.ctx, req, command))

    async def on_post_pause(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance: UUID
    ) -> None:
        await self._control(req, resp, PauseRun(instance))

    async def on_post_resume(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance: UUID
    ) -> None:
        await self._control(req, resp, ResumeRun(instance))

    async def on_post_cancel(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance: UUID
    ) -> None:
        await self._control(req, resp, CancelRun(instance))

    async def on_post_compensate(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance: UUID
    ) -> None:
        body = await v.json_body(req)
        task = str(v.text(body, "fromTaskId", max_len=64))
        await self._control(req, resp, CompensateRun(instance, task))

    async def on_post_retry(
        self, req: falcon.asgi.Request, resp: falcon.asgi.Response, instance: UUID, task_id: str
    ) -> None:
        body = await v.json_body(req)
        given = body.get("input")
        if given is not None and not isinstance(given, dict):
            raise falcon.HTTPBadRequest(description="input must be a JSON object")
        new_input = json_text(given, "input") if given is not None else None
        await self._control(req, resp, RetryWorkflowTask(instance, task_id, new_input))


def run_view(run: WorkflowRun) -> dict[str, Any]:
    """A run as ``GET /api/v1/workflow-runs/{id}`` shows it."""
    return {
        "instanceId": str(run.id),
        "namespace": run.namespace,
        "workflowName": run.name,
        "version": run.workflow_version,
        "runId": run.run_id,
        "state": run.state,
        "sequenceNumber": run.version,
        "input": orjson.loads(run.input),
        "startedAt": run.started_at.isoformat(),
        "endedAt": run.ended_at.isoformat() if run.ended_at else None,
        "tasks": [
            {
                "taskId": t.id,
                "id": workflow_task_id(run.id, t.id),
                "state": t.status,
                "attempts": t.attempts,
                "fenceToken": t.fence,
                "leaseHolder": t.holder,
                "output": orjson.loads(t.output) if t.output is not None else None,
                "error": t.error,
            }
            for t in run.tasks.values()
        ],
    }
