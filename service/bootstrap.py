"""The composition root: every long-lived part of Tadpole, built in one place.

:func:`bootstrap` builds the parts from :class:`~service.settings.Settings`
without connecting anything; :meth:`Tadpole.start` opens the connections (the
event store and its tables, the writer's recovery, the views' pools, the
reapers) and :meth:`Tadpole.stop` closes them. The API process, the relay and
projector processes, and the tests all build through it; a test passes the
parts it fakes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from api.resources import ApiContext, Writer
from domain.audit import AuditLog
from domain.jobs import OpenJobs
from domain.processor import CommandProcessor
from domain.spots import LiveSpots
from eventstore.recorder import AsyncAppender, OneTripRecorder
from eventstore.store import StorePort, TadpoleStore
from projections.views import PostgresViews, RedisViews
from service.reapers import Reapers
from service.settings import Settings
from service.wiring import open_store
from service.writer import GroupCommitWriter
from streaming.broker import broker_reachable
from streaming.health import PipelineStatus
from streaming.topics import TopicCatalogue

if TYPE_CHECKING:
    from streaming.consumer import Projector
    from streaming.relay import Relay

log = logging.getLogger(__name__)


@dataclass
class Tadpole:
    """The parts of one Tadpole process; connected by :meth:`start`."""

    settings: Settings
    redis: Any
    postgres: Any
    open_store: Callable[[Settings], TadpoleStore]
    store: TadpoleStore | None = None
    processor: CommandProcessor | None = None
    writer: Writer | None = None
    appender: AsyncAppender | None = None
    reapers: Reapers | None = None
    run_reapers: bool = True
    ctx: ApiContext = field(init=False)

    def __post_init__(self) -> None:
        s = self.settings
        self.ctx = ApiContext(
            writer=_NotStarted(),
            redis=self.redis,
            postgres=self.postgres,
            audit=_NotStarted(),
            block_ids=lambda job: [],
            max_sweep_tasks=s.max_sweep_tasks,
            max_sweep_bytes=s.max_sweep_bytes,
            read_wait=s.read_wait,
            spot_ids=lambda: [],
            degraded_lag=s.degraded_lag,
            broker_up=(
                (lambda: broker_reachable(s.kafka_bootstrap_servers))
                if s.kafka_bootstrap_servers
                else None
            ),
        )
        if self.store is not None:  # given (a test): wire what needs no connection now
            self._wire(self.store)

    # ---- the API process -----------------------------------------------------------

    def _wire(self, store: TadpoleStore) -> None:
        s = self.settings
        if self.processor is None:
            self.processor = CommandProcessor(
                StorePort(store),
                s.max_attempts,
                s.heartbeat_store_interval,
                lease_seconds=s.lease_seconds,
            )
        processor = self.processor
        if self.writer is None:
            self.appender = AsyncAppender(store, s.database_url, timeout=s.command_timeout)
            self.writer = GroupCommitWriter(
                processor,
                append=self.appender.append,
                timeout=s.command_timeout,
                probe=self.appender.ping,
                look_up=self.appender.existing,
            )
            self.ctx.store_ping = self.appender.ping  # bounded by the command timeout
            self.ctx.pipeline = PipelineStatus(store)
        self.ctx.writer = self.writer
        self.ctx.audit = AuditLog(store)
        jobs, spots = processor.state(OpenJobs), processor.state(LiveSpots)
        self.ctx.block_ids = jobs.block_ids
        self.ctx.spot_ids = spots.ids

    async def start(self) -> None:
        """Open the store, recover the writer's state, start it, the views and the reapers."""
        if self.store is None:
            self.store = await asyncio.to_thread(self.open_store, self.settings)
            self._wire(self.store)
        assert self.processor is not None
        await asyncio.to_thread(self.processor.recover, datetime.now(UTC))
        if isinstance(self.writer, GroupCommitWriter):
            self.writer.start()
            if self.run_reapers:
                self.reapers = Reapers(self.settings, self.writer)
                await self.reapers.start()
        await self.postgres.open()
        jobs, spots = self.processor.state(OpenJobs), self.processor.state(LiveSpots)
        log.info(
            "API ready: %d open task blocks, %d live spots", len(jobs.blocks), len(spots.spots)
        )

    async def stop(self) -> None:
        if self.reapers is not None:
            await self.reapers.stop()
        if isinstance(self.writer, GroupCommitWriter):
            await self.writer.stop()
        if self.appender is not None:
            await self.appender.close()
        if self.store is not None:
            self.store.close()
        await self.redis.close()
        await self.postgres.close()

    # ---- the relay and projector processes -------------------------------------------

    def relay(self, store: TadpoleStore, bootstrap_servers: str) -> Relay:
        from projections.redis.dashboards import LagSamples
        from streaming.relay import Relay, RelayPosition, StoreWakeups

        s = self.settings
        return Relay(
            store,
            RelayPosition(s.database_url, s.store_schema),
            bootstrap_servers,
            topic_catalogue(s),
            lag=LagSamples(s.redis_url, s.redis_prefix, "relay"),
            wakeups=(
                StoreWakeups(s.database_url, store.recorder.channel_name)
                if isinstance(store.recorder, OneTripRecorder)
                else None
            ),
        )

    def projector(self, store: TadpoleStore, bootstrap_servers: str, which: str) -> Projector:
        from projections.postgres.tables import PostgresReadModel
        from projections.redis.dashboards import LagSamples, RedisReadModel
        from streaming.consumer import Projector, ReadModel, StoreReader

        s = self.settings
        model: ReadModel
        if which == "postgres":
            model = PostgresReadModel(s.database_url, s.read_schema, StoreReader(store).first_event)
        else:
            model = RedisReadModel(s.redis_url, s.redis_prefix)
        return Projector(
            model,
            store,
            bootstrap_servers,
            topic_catalogue(s),
            lag=LagSamples(s.redis_url, s.redis_prefix, which),
        )


class _NotStarted:
    """Stands in for the parts that exist once :meth:`Tadpole.start` has run."""

    ready = False

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("Tadpole has not been started: call start() first")


def bootstrap(
    settings: Settings,
    *,
    store: TadpoleStore | None = None,
    processor: CommandProcessor | None = None,
    writer: Writer | None = None,
    redis: Any = None,
    postgres: Any = None,
    open_store: Callable[[Settings], TadpoleStore] = open_store,
    run_reapers: bool = True,
) -> Tadpole:
    """Build every part from ``settings``, connecting nothing; pass a part to replace it.

    Tests pass a store in memory, a writer without group commit, or fake views;
    the processes pass nothing.
    """
    return Tadpole(
        settings=settings,
        redis=redis if redis is not None else RedisViews(settings.redis_url, settings.redis_prefix),
        postgres=(
            postgres
            if postgres is not None
            else PostgresViews(settings.database_url, settings.read_schema)
        ),
        open_store=open_store,
        store=store,
        processor=processor,
        writer=writer,
        run_reapers=run_reapers,
    )


def topic_catalogue(settings: Settings) -> TopicCatalogue:
    """The deployment's topics: their prefix, and their partitions when set."""
    return TopicCatalogue(settings.topic_prefix, settings.topic_partitions)
