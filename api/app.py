"""The falcon ASGI application: routes, middleware and error handlers only."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi
import falcon.media
import falcon.routing
import orjson

from api import fleet as f
from api import resources as r
from api import sagas as s
from api import validation as v
from api import workflows as w
from api.converters import CONVERTERS
from api.errors import ERROR_HANDLERS, serialize_error
from api.middleware import AgentKey, KnownMethods

App = falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]


def create_app(ctx: r.ApiContext, agent_key: str = "", middleware: list[Any] | None = None) -> App:
    allowed: dict[str, list[str]] = {}
    app = falcon.asgi.App(
        middleware=[*(middleware or []), KnownMethods(allowed), AgentKey(agent_key), v.PathParams()]
    )
    # orjson both ways: the standard library's encoder was a twentieth of the API's
    # CPU under load, on answers it turns out compact anyway.
    json = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = json
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = json
    app.set_error_serializer(serialize_error)
    for error, handler in ERROR_HANDLERS.items():
        app.add_error_handler(error, handler)
    app.router_options.converters.update(CONVERTERS)
    app.req_options.strip_url_path_trailing_slash = True

    def route(template: str, resource: object, suffix: str | None = None) -> None:
        _head_as_get(resource, suffix)
        app.add_route(template, resource, suffix=suffix)
        allowed[template] = [*sorted(falcon.routing.map_http_methods(resource, suffix)), "OPTIONS"]

    jobs = r.Jobs(ctx)
    reports = r.TaskReports(ctx)
    route("/api/v1/health", r.Health(ctx))
    route("/ready", r.Ready(ctx))
    route("/api/v1/spots", r.Spots(ctx))
    route("/api/v1/jobs", jobs)
    route("/api/v1/jobs/{job:job}", jobs, suffix="one")
    route("/api/v1/jobs/{job:job}/results", jobs, suffix="results")
    route("/api/v1/audit/{aggregate}/{entity_id}/events", r.AuditEvents(ctx))
    route("/internal/v1/hello", r.Hellos(ctx))
    route("/internal/v1/heartbeat", r.Heartbeats(ctx))
    route("/internal/v1/tasks/claim", r.Claims(ctx))
    route("/internal/v1/tasks/{task_id:task}/complete", reports, suffix="complete")
    route("/internal/v1/tasks/{task_id:task}/fail", reports, suffix="fail")
    route("/internal/v1/tasks/{task_id:task}/renew", reports, suffix="renew")
    workflows, runs = w.Workflows(ctx), w.WorkflowRuns(ctx)
    route("/api/v1/workflows", workflows)
    route("/api/v1/workflows/{namespace}/{name}/runs", workflows, suffix="runs")
    route("/api/v1/workflow-runs/{instance:instance}", runs)
    for action in ("pause", "resume", "cancel", "compensate"):
        route(f"/api/v1/workflow-runs/{{instance:instance}}/{action}", runs, suffix=action)
    route("/api/v1/workflow-runs/{instance:instance}/tasks/{task_id}/retry", runs, suffix="retry")
    targets, contexts, agents, meshes = (
        f.Targets(ctx),
        f.Contexts(ctx),
        f.Agents(ctx),
        f.Meshes(ctx),
    )
    route("/api/v1/targets/{target_id}", targets)
    route("/v1/targets/{target_id}/status", targets, suffix="status")
    route("/api/v1/contexts/{context_id}", contexts)
    route("/api/v1/agents/spawn", agents, suffix="spawn")
    route("/api/v1/agents/{agent:agent}", agents, suffix="one")
    route("/api/v1/agents/{agent:agent}/performance", agents, suffix="performance")
    route("/api/v1/agents/{agent:agent}/capabilities", agents, suffix="capabilities")
    route("/api/v1/meshes", meshes)
    route("/api/v1/meshes/{mesh:mesh}", meshes, suffix="one")
    route("/api/v1/meshes/{mesh:mesh}/performance", meshes, suffix="performance")
    route("/api/v1/meshes/{mesh:mesh}/members/{agent:agent}", meshes, suffix="member")
    route("/api/v1/system/events", f.SystemEvents(ctx))
    scheduler = f.Scheduler(ctx)
    route("/v1/scheduler/health", scheduler, suffix="health")
    route("/v1/scheduler/metrics", scheduler, suffix="metrics")
    sagas, steps = s.Sagas(ctx), s.SagaSteps(ctx)
    route("/api/v1/sagas", sagas)
    route("/api/v1/sagas/{saga:saga}", sagas, suffix="one")
    route("/internal/v1/sagas/{saga:saga}/steps/take", steps, suffix="take")
    route("/internal/v1/sagas/{saga:saga}/steps/{step}/finish", steps, suffix="finish")
    route("/internal/v1/sagas/{saga:saga}/compensations/take", steps, suffix="take_compensation")
    route(
        "/internal/v1/sagas/{saga:saga}/compensations/{step}/finish",
        steps,
        suffix="finish_compensation",
    )
    return app


def _head_as_get(resource: object, suffix: str | None) -> None:
    """Serve HEAD wherever GET is served: falcon maps no HEAD by itself, and drops the body."""
    name = f"_{suffix}" if suffix else ""
    get = getattr(resource, f"on_get{name}", None)
    if get is not None and not hasattr(resource, f"on_head{name}"):
        setattr(resource, f"on_head{name}", get)
