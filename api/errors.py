"""Every error is an HTTP error with a JSON body ``{"success": false, "error": ...}``.

Results map to HTTP here and nowhere else: :data:`RESPONSES` has one entry per
result class the families declare (``tests/unit/test_registry.py`` checks it),
and the domain's errors are falcon error handlers (:data:`ERROR_HANDLERS`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
import psycopg
import psycopg_pool
import redis

from domain.contexts import ContextModified
from domain.family import (
    ConflictError,
    NotFoundError,
    Ok,
    OutcomeUnknownError,
    Reaped,
    Result,
    StoreUnavailableError,
)
from domain.jobs import Finished, JobCreated
from domain.jobs.tasks import Outcome
from domain.sagas import SagaStarted, StepFinished, StepTaken, TimersFired
from domain.spots import Claimed, SpotRegistered
from domain.targets import TargetUpdated
from domain.workflows import LeaseExtended, RunStarted, TaskReported, WorkflowRegistered

Response = falcon.asgi.Response


def answer(resp: Response, result: Result, *, failing: bool = False) -> None:
    """Set the response for a command's result; a domain error is raised, for its handler."""
    if isinstance(result, Exception):
        raise result
    RESPONSES[type(result)](resp, result, failing)


def answer_with_claim(
    resp: Response, report: Result | BaseException, claim: Result | BaseException, *, failing: bool
) -> None:
    """Answer a report decided with a claim: the report's status and body, plus the
    claimed ``tasks`` (and ``claimError`` when the claim was refused), even when the
    report was refused: the claimed tasks are the spot's now."""
    if isinstance(claim, BaseException) and not isinstance(claim, Exception):
        raise claim  # cancelled
    extra: dict[str, Any] = {"tasks": _claimed_tasks(claim) if isinstance(claim, Claimed) else []}
    if isinstance(claim, Exception):
        extra["claimError"] = str(http_error(claim).description or claim)
    try:
        if isinstance(report, BaseException):
            raise report
        answer(resp, report, failing=failing)
    except Exception as refused:
        error = refused if isinstance(refused, falcon.HTTPError) else http_error(refused)
        resp.status = error.status
        resp.media = {"success": False, "error": error.description or error.title}
        if error.headers:
            resp.set_headers(error.headers)
    resp.media = {**resp.media, **extra}


def _job_created(resp: Response, result: JobCreated, failing: bool) -> None:
    resp.status = falcon.HTTP_200 if result.replayed else falcon.HTTP_201
    resp.media = {"success": True, "jobId": result.job_id, "totalTasks": result.total_tasks}
    resp.location = f"/api/v1/jobs/{result.job_id}"


def _spot_registered(resp: Response, result: SpotRegistered, failing: bool) -> None:
    resp.media = {"spotId": result.spot_id}


def _claimed(resp: Response, result: Claimed, failing: bool) -> None:
    resp.media = {"tasks": _claimed_tasks(result)}


def _claimed_tasks(result: Claimed) -> list[dict[str, Any]]:
    return [{"id": t.task_id, "payload": t.payload, "fenceToken": t.fence} for t in result.tasks]


def _finished(resp: Response, result: Finished, failing: bool) -> None:
    if result.outcome is Outcome.ACCEPTED:
        resp.media = (
            {"success": True, "willRetry": result.will_retry} if failing else {"success": True}
        )
    elif result.outcome in (Outcome.ALREADY_COMPLETED, Outcome.ALREADY_TERMINAL):
        resp.media = {"success": True, "message": result.outcome.value}
    else:
        raise falcon.HTTPConflict(description=result.outcome.value)


def _workflow_registered(resp: Response, result: WorkflowRegistered, failing: bool) -> None:
    resp.status = falcon.HTTP_201 if result.created else falcon.HTTP_200
    resp.media = {
        "success": True,
        "namespace": result.namespace,
        "name": result.name,
        "version": result.version,
    }


def _run_started(resp: Response, result: RunStarted, failing: bool) -> None:
    resp.status = falcon.HTTP_201 if result.created else falcon.HTTP_200
    resp.media = {"success": True, "instanceId": str(result.instance_id)}
    resp.location = f"/api/v1/workflow-runs/{result.instance_id}"


def _task_reported(resp: Response, result: TaskReported, failing: bool) -> None:
    resp.media = (
        {"success": True, "willRetry": result.will_retry}
        if result.will_retry is not None
        else {"success": True}
    )


def _lease_extended(resp: Response, result: LeaseExtended, failing: bool) -> None:
    resp.media = {"success": True, "leaseExpiresAt": result.expires_at.isoformat()}


def _target_updated(resp: Response, result: TargetUpdated, failing: bool) -> None:
    resp.status = falcon.HTTP_201 if result.created else falcon.HTTP_200
    resp.media = {"success": True, "targetId": result.target_id, "changed": result.changed}
    resp.location = f"/v1/targets/{result.target_id}/status"


def _context_modified(resp: Response, result: ContextModified, failing: bool) -> None:
    resp.status = falcon.HTTP_201 if result.created else falcon.HTTP_200
    resp.media = {"success": True, "contextId": result.context_id, "changed": result.changed}
    resp.location = f"/api/v1/contexts/{result.context_id}"


def _saga_started(resp: Response, result: SagaStarted, failing: bool) -> None:
    """202: the saga runs on; a retried start (same ``Idempotency-Key``) answers 200."""
    resp.status = falcon.HTTP_202 if result.created else falcon.HTTP_200
    media: dict[str, Any] = {"success": True, "sagaId": result.saga_id, "kind": result.kind}
    if result.agent_id is not None:
        media["agentId"] = result.agent_id
    if result.mesh_id is not None:
        media["meshId"] = result.mesh_id
    resp.media = media
    resp.location = f"/api/v1/sagas/{result.saga_id}"


def _step_taken(resp: Response, result: StepTaken, failing: bool) -> None:
    resp.media = {"success": True, **_taken(result)}


def _taken(result: StepTaken) -> dict[str, Any]:
    return {
        "sagaId": result.saga_id,
        "kind": result.kind,
        "step": result.step,
        "compensation": result.compensation,
        "fenceToken": result.fence,
        "deadline": result.deadline.isoformat(),
        "params": result.params,
        "outcome": result.outcome,
    }


def _step_finished(resp: Response, result: StepFinished, failing: bool) -> None:
    resp.media = {
        "success": True,
        "sagaId": result.saga_id,
        "step": result.step,
        "stepState": result.step_state,
        "sagaState": result.saga_state,
        "error": result.error,
        "next": _taken(result.next) if result.next is not None else None,
    }


def _ok(resp: Response, result: Any, failing: bool) -> None:
    resp.media = {"success": True}


#: Result class → how it is answered (``failing``: the command was a fail).
RESPONSES: dict[type, Callable[[Response, Any, bool], None]] = {
    JobCreated: _job_created,
    SpotRegistered: _spot_registered,
    Claimed: _claimed,
    Finished: _finished,
    Reaped: _ok,
    Ok: _ok,
    WorkflowRegistered: _workflow_registered,
    RunStarted: _run_started,
    TaskReported: _task_reported,
    LeaseExtended: _lease_extended,
    TargetUpdated: _target_updated,
    ContextModified: _context_modified,
    SagaStarted: _saga_started,
    StepTaken: _step_taken,
    StepFinished: _step_finished,
    TimersFired: _ok,
}


def serialize_error(req: falcon.asgi.Request, resp: Response, error: falcon.HTTPError) -> None:
    """Falcon's error serializer: our body shape for every HTTP error."""
    message = error.description or error.title or "error"
    if isinstance(error, falcon.HTTPRouteNotFound):
        message = f"no route {req.method} {req.path}"
    elif isinstance(error, falcon.HTTPMethodNotAllowed):
        message = f"method {req.method} is not allowed on {req.path}"
    resp.media = {"success": False, "error": message}
    resp.content_type = falcon.MEDIA_JSON


def _not_found(error: Exception) -> falcon.HTTPError:
    return falcon.HTTPNotFound(description=str(error))


def _conflict(error: Exception) -> falcon.HTTPError:
    return falcon.HTTPConflict(description=str(error))


def _store_unavailable(error: Exception) -> falcon.HTTPError:
    if isinstance(error, OutcomeUnknownError):
        description = "the event store did not confirm in time; the command may have been stored"
    else:
        description = "the event store is unavailable; nothing was written, retry shortly"
    return falcon.HTTPServiceUnavailable(description=description, retry_after=1)


def _read_model_unavailable(error: Exception) -> falcon.HTTPError:
    return falcon.HTTPServiceUnavailable(
        description=f"the read model is unavailable ({type(error).__name__}); retry shortly",
        retry_after=1,
    )


#: Errors of the read models' clients that mean "unreachable right now" (503).
READ_MODEL_DOWN: tuple[type[Exception], ...] = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    redis.ConnectionError,
    redis.TimeoutError,
)

#: Exception class → the HTTP error it is answered with.
HTTP_ERRORS: dict[type[Exception], Callable[[Exception], falcon.HTTPError]] = {
    NotFoundError: _not_found,
    ConflictError: _conflict,
    StoreUnavailableError: _store_unavailable,
    **{error: _read_model_unavailable for error in READ_MODEL_DOWN},
}


def http_error(error: Exception) -> falcon.HTTPError:
    """The HTTP error a domain or read-model error is answered with (500 if none is known)."""
    for cls in type(error).__mro__:
        if cls in HTTP_ERRORS:
            return HTTP_ERRORS[cls](error)
    return falcon.HTTPInternalServerError(description=f"{type(error).__name__}: {error}")


async def _raise_http_error(
    req: falcon.asgi.Request, resp: Response, error: Exception, params: object
) -> None:
    raise http_error(error)


#: Exception class → its falcon error handler.
ERROR_HANDLERS: dict[type[Exception], Any] = dict.fromkeys(HTTP_ERRORS, _raise_http_error)
