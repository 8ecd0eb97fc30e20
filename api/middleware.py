"""Cross-cutting concerns: the agent key on the internal API."""

from __future__ import annotations

import hmac

import falcon
import falcon.asgi

#: Every route whose template lies under this prefix is a worker route.
INTERNAL = "/internal/"


class AgentKey:
    """With a key configured, every worker route needs ``X-Orhestra-Key`` (constant-time check).

    The check runs on the route the router matched, never on the path as spelled:
    the router ignores repeated slashes and the server decodes ``%61`` and ``%2F``,
    so a prefix test on the raw path would let ``//internal/v1/hello`` through.
    Any spelling that reaches a worker resource went through its ``/internal/``
    template, and an unmatched one is a 404 that reaches no resource at all.
    """

    def __init__(self, key: str):
        self.key = key.encode()

    async def process_resource(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        params: dict[str, object],
    ) -> None:
        if not self.key or not is_worker_route(req.uri_template):
            return
        given = (req.get_header("X-Orhestra-Key") or "").encode()
        if not hmac.compare_digest(given, self.key):
            raise falcon.HTTPUnauthorized(
                description="missing or wrong X-Orhestra-Key header",
                challenges=["X-Orhestra-Key"],
            )


def is_worker_route(template: str | None) -> bool:
    """Whether the matched route ``template`` is one of the worker API's."""
    return template is not None and template.startswith(INTERNAL)


class KnownMethods:
    """A method falcon does not know (``PURGE``, ``FOO``) is a 405 naming the allowed ones.

    Falcon answers those with a 400 of its own; the route's ``allowed`` methods
    (by route template) make it the same 405 as any other method the route lacks.
    """

    def __init__(self, allowed: dict[str, list[str]]):
        self.allowed = allowed

    async def process_resource(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        params: dict[str, object],
    ) -> None:
        if req.method not in falcon.COMBINED_METHODS and req.uri_template in self.allowed:
            raise falcon.HTTPMethodNotAllowed(self.allowed[req.uri_template])
