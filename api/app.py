"""The falcon ASGI application: routes, middleware and error handlers only."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi
import falcon.media
import orjson

from api import resources as r
from api.errors import READ_MODEL_DOWN, read_model_unavailable, serialize_error, store_unavailable
from api.middleware import AgentKey
from service.writer import StoreUnavailableError


def create_app(
    ctx: r.ApiContext, agent_key: str = "", middleware: list[Any] | None = None
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    app = falcon.asgi.App(middleware=[*(middleware or []), AgentKey(agent_key)])
    # orjson both ways: the standard library's encoder was a twentieth of the API's
    # CPU under load, on answers it turns out compact anyway.
    json = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = json
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json
    app.set_error_serializer(serialize_error)
    app.add_error_handler(StoreUnavailableError, store_unavailable)
    for error in READ_MODEL_DOWN:
        app.add_error_handler(error, read_model_unavailable)
    app.req_options.strip_url_path_trailing_slash = True

    jobs = r.Jobs(ctx)
    reports = r.TaskReports(ctx)
    app.add_route("/api/v1/health", r.Health(ctx))
    app.add_route("/ready", r.Ready(ctx))
    app.add_route("/api/v1/spots", r.Spots(ctx))
    app.add_route("/api/v1/jobs", jobs)
    app.add_route("/api/v1/jobs/{job_id}", jobs, suffix="one")
    app.add_route("/api/v1/jobs/{job_id}/results", jobs, suffix="results")
    app.add_route("/api/v1/audit/{aggregate}/{entity_id}/events", r.AuditEvents(ctx))
    app.add_route("/internal/v1/hello", r.Hellos(ctx))
    app.add_route("/internal/v1/heartbeat", r.Heartbeats(ctx))
    app.add_route("/internal/v1/tasks/claim", r.Claims(ctx))
    app.add_route("/internal/v1/tasks/{task_id}/complete", reports, suffix="complete")
    app.add_route("/internal/v1/tasks/{task_id}/fail", reports, suffix="fail")
    return app
