"""TaskReaper, SpotReaper and the workflow and saga timers: periodic commands, run by one API
process at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from domain.jobs import ReapTasks
from domain.sagas import FireSagaTimers
from domain.spots import ReapSpots
from domain.workflows import FireTimers
from service.settings import Settings
from service.writer import GroupCommitWriter
from streaming.locks import reapers_lock

log = logging.getLogger(__name__)


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
            asyncio.create_task(self._loop(FireTimers(), self.settings.timer_interval)),
            asyncio.create_task(self._loop(FireSagaTimers(), self.settings.timer_interval)),
        ]

    async def _leader(self) -> bool:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.settings.database_url, autocommit=True, connect_timeout=5
            )
        # One lock per deployment (its store schema): deployments sharing a database
        # each get their own active reapers.
        cur = await self.conn.execute(*reapers_lock(self.settings.store_schema).try_lock())
        row = await cur.fetchone()
        return bool(row and row[0])

    async def _loop(
        self, command: ReapSpots | ReapTasks | FireTimers | FireSagaTimers, interval: float
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._leader():
                    result = await self.writer.submit(command)
                    if any(getattr(result, f, None) for f in ("spots", "tasks", "sagas")):
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
