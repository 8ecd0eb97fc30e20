"""Every error is an HTTP error with a JSON body ``{"success": false, "error": ...}``.

Domain results map to status codes here and nowhere else.
"""

from __future__ import annotations

import falcon
import falcon.asgi
import psycopg
import psycopg_pool
import redis

from domain.commands import (
    Claimed,
    ConflictError,
    Finished,
    JobCreated,
    NotFoundError,
    Ok,
    OutcomeUnknownError,
    Reaped,
    Result,
    SpotRegistered,
    StoreUnavailableError,
)
from domain.tasks import Outcome


def answer(resp: falcon.asgi.Response, result: Result, *, failing: bool = False) -> None:
    """Set the response for a command's result."""
    match result:
        case JobCreated():
            resp.status = falcon.HTTP_200 if result.replayed else falcon.HTTP_201
            resp.media = {"success": True, "jobId": result.job_id, "totalTasks": result.total_tasks}
            resp.location = f"/api/v1/jobs/{result.job_id}"
        case SpotRegistered():
            resp.media = {"spotId": result.spot_id}
        case Claimed():
            resp.media = {
                "tasks": [
                    {"id": t.task_id, "payload": t.payload, "fenceToken": t.fence}
                    for t in result.tasks
                ]
            }
        case Finished():
            _finished(resp, result, failing)
        case NotFoundError():
            raise falcon.HTTPNotFound(description=str(result))
        case ConflictError():
            raise falcon.HTTPConflict(description=str(result))
        case Ok() | Reaped():
            resp.media = {"success": True}


def _finished(resp: falcon.asgi.Response, result: Finished, failing: bool) -> None:
    if result.outcome is Outcome.ACCEPTED:
        resp.media = (
            {"success": True, "willRetry": result.will_retry} if failing else {"success": True}
        )
    elif result.outcome in (Outcome.ALREADY_COMPLETED, Outcome.ALREADY_TERMINAL):
        resp.media = {"success": True, "message": result.outcome.value}
    else:
        raise falcon.HTTPConflict(description=result.outcome.value)


def serialize_error(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: falcon.HTTPError
) -> None:
    """Falcon's error serializer: our body shape for every HTTP error."""
    message = error.description or error.title or "error"
    if isinstance(error, falcon.HTTPRouteNotFound):
        message = f"no route {req.method} {req.path}"
    elif isinstance(error, falcon.HTTPMethodNotAllowed):
        message = f"method {req.method} is not allowed on {req.path}"
    resp.media = {"success": False, "error": message}
    resp.content_type = falcon.MEDIA_JSON


async def store_unavailable(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: object
) -> None:
    if isinstance(error, OutcomeUnknownError):
        description = "the event store did not confirm in time; the command may have been stored"
    else:
        description = "the event store is unavailable; nothing was written, retry shortly"
    raise falcon.HTTPServiceUnavailable(description=description, retry_after=1)


async def read_model_unavailable(
    req: falcon.asgi.Request, resp: falcon.asgi.Response, error: Exception, params: object
) -> None:
    raise falcon.HTTPServiceUnavailable(
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


__all__ = [
    "READ_MODEL_DOWN",
    "StoreUnavailableError",
    "answer",
    "read_model_unavailable",
    "serialize_error",
    "store_unavailable",
]
