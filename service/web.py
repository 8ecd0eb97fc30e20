"""The API process: the falcon ASGI app with the single writer and the reapers inside.

Everything that connects is started in the ASGI lifespan startup, after gunicorn
forked the worker, never at import: :mod:`service.bootstrap` builds the parts.
"""

from __future__ import annotations

from typing import Any

import falcon.asgi

from api.app import create_app
from service.bootstrap import Tadpole, bootstrap
from service.settings import Settings, load_settings
from service.wiring import configure_logging


class Lifespan:
    """Falcon middleware that starts and stops the process's parts."""

    def __init__(self, tadpole: Tadpole):
        self.tadpole = tadpole

    async def process_startup(self, scope: Any, event: Any) -> None:
        await self.tadpole.start()

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        await self.tadpole.stop()


def build_app(
    settings: Settings | None = None,
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """The ASGI app for one API worker; connections open at lifespan startup."""
    settings = settings or load_settings()
    configure_logging(settings)
    tadpole = bootstrap(settings)
    return create_app(tadpole.ctx, settings.agent_key, middleware=[Lifespan(tadpole)])


def app_factory() -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """Entry point for gunicorn: ``service.web:app_factory()``."""
    return build_app()
