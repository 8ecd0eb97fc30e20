"""Cross-cutting concerns: the agent key on the internal API."""

from __future__ import annotations

import hmac

import falcon
import falcon.asgi

INTERNAL = "/internal/v1/"


class AgentKey:
    """With a key configured, ``/internal/v1/*`` needs ``X-Orhestra-Key`` (constant-time check)."""

    def __init__(self, key: str):
        self.key = key.encode()

    async def process_request(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        if not self.key or not req.path.startswith(INTERNAL):
            return
        given = (req.get_header("X-Orhestra-Key") or "").encode()
        if not hmac.compare_digest(given, self.key):
            raise falcon.HTTPUnauthorized(
                description="missing or wrong X-Orhestra-Key header",
                challenges=["X-Orhestra-Key"],
            )
