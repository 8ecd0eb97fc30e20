"""The API process: the falcon ASGI app with the single writer and the reapers inside.

Everything that connects is built in the ASGI lifespan startup, after gunicorn
forked the worker, never at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

import falcon.asgi
import psycopg

from api.app import create_app
from api.resources import ApiContext
from domain.audit import AuditLog
from domain.commands import CommandProcessor, ReapSpots, ReapTasks
from domain.store import StorePort, TadpoleStore
from projections.views import PostgresViews, RedisViews
from service.recorder import AsyncAppender
from service.settings import Settings, load_settings
from service.wiring import configure_logging, open_store
from service.writer import GroupCommitWriter
from streaming.broker import broker_reachable
from streaming.health import PipelineStatus

log = logging.getLogger(__name__)

REAPER_LOCK = 0x7AD9013  # advisory lock key: one active reaper across processes


class Reapers:
    """TaskReaper and SpotReaper; only the process holding the advisory lock runs them."""

    def __init__(self, settings: Settings, writer: GroupCommitWriter):
        self.settings = settings
        self.writer = writer
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(
                self._loop(
                    ReapSpots(self.settings.spot_timeout), self.settings.spot_reaper_interval
                )
            ),
            asyncio.create_task(
                self._loop(
                    ReapTasks(self.settings.task_reaper_threshold),
                    self.settings.task_reaper_interval,
                )
            ),
        ]

    async def _leader(self) -> bool:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.settings.database_url, autocommit=True
            )
        # One lock per deployment (its store schema): deployments sharing a database
        # each get their own active reapers.
        cur = await self.conn.execute(
            "SELECT pg_try_advisory_lock(hashtext(%s))",
            (f"tadpole-reapers:{self.settings.store_schema}",),
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _loop(self, command: ReapSpots | ReapTasks, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._leader():
                    result = await self.writer.submit(command)
                    if getattr(result, "spots", None) or getattr(result, "tasks", None):
                        log.info("%s: %s", type(command).__name__, result)
            except Exception:  # a reaper must outlive a failed round
                log.exception("%s round failed", type(command).__name__)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.conn is not None and not self.conn.closed:
            # Let go of the lock now: a closed connection's session may linger a moment.
            with contextlib.suppress(psycopg.Error):
                await self.conn.execute("SELECT pg_advisory_unlock_all()")
            await self.conn.close()


def build_writer(
    store: TadpoleStore, processor: CommandProcessor, settings: Settings
) -> tuple[GroupCommitWriter, AsyncAppender]:
    """The single writer, appending on the event loop, every command bounded by
    ``TADPOLE_COMMAND_TIMEOUT``; the appender also probes a store that went down."""
    timeout = settings.command_timeout
    appender = AsyncAppender(store, settings.database_url, timeout=timeout)
    writer = GroupCommitWriter(
        processor, append=appender.append, timeout=timeout, probe=appender.ping
    )
    return writer, appender


class Lifespan:
    """Falcon middleware that builds and tears down the process's connections."""

    def __init__(self, settings: Settings, ctx: ApiContext, holder: dict[str, Any]):
        self.settings = settings
        self.ctx = ctx
        self.holder = holder

    async def process_startup(self, scope: Any, event: Any) -> None:
        s = self.settings
        store: TadpoleStore = await asyncio.to_thread(open_store, s)
        processor = CommandProcessor(StorePort(store), s.max_attempts, s.heartbeat_store_interval)
        await asyncio.to_thread(processor.recover, datetime.now(UTC))
        writer, appender = build_writer(store, processor, s)
        writer.start()
        self.ctx.writer = writer
        self.ctx.audit = AuditLog(store)
        self.ctx.block_ids = lambda job: (
            j.block_ids() if (j := processor.jobs.get(job)) is not None else []
        )
        self.ctx.spot_ids = lambda: list(processor.spots)
        self.ctx.pipeline = PipelineStatus(store)
        self.ctx.store_ping = appender.ping  # bounded by the command timeout
        await self.ctx.postgres.open()
        reapers = Reapers(s, writer)
        await reapers.start()
        self.holder.update(store=store, writer=writer, reapers=reapers, appender=appender)
        log.info(
            "API ready: %d open task blocks, %d spots", len(processor.blocks), len(processor.spots)
        )

    async def process_shutdown(self, scope: Any, event: Any) -> None:
        if "reapers" in self.holder:
            await self.holder["reapers"].stop()
            await self.holder["writer"].stop()
            await self.holder["appender"].close()
            self.holder["store"].close()
        await self.ctx.redis.close()
        await self.ctx.postgres.close()


def build_app(
    settings: Settings | None = None,
) -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """The ASGI app for one API worker; connections open at lifespan startup."""
    settings = settings or load_settings()
    configure_logging(settings)
    ctx = ApiContext(
        writer=None,  # type: ignore[arg-type]  # set at startup
        redis=RedisViews(settings.redis_url, settings.redis_prefix),
        postgres=PostgresViews(settings.database_url, settings.read_schema),
        audit=None,  # type: ignore[arg-type]
        block_ids=lambda job: [],
        max_sweep_tasks=settings.max_sweep_tasks,
        max_sweep_bytes=settings.max_sweep_bytes,
        read_wait=settings.read_wait,
        spot_ids=lambda: [],
        degraded_lag=settings.degraded_lag,
        broker_up=(
            (lambda: broker_reachable(settings.kafka_bootstrap_servers))
            if settings.kafka_bootstrap_servers
            else None
        ),
    )
    holder: dict[str, Any] = {}
    return create_app(ctx, settings.agent_key, middleware=[Lifespan(settings, ctx, holder)])


def app_factory() -> falcon.asgi.App[falcon.asgi.Request, falcon.asgi.Response]:
    """Entry point for gunicorn: ``service.web:app_factory()``."""
    return build_app()
