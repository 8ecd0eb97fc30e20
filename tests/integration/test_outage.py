"""The single writer while PostgreSQL is unreachable, against the real PostgreSQL.

A :class:`~tests.integration.support.TcpProxy` stands between the writer (its
appender and the event store's pool) and the database, so that a test can take
the database away and bring it back without touching the server. Every command
must be answered within the command timeout, none that its caller stopped
waiting for may be carried out later, and commands succeed again once the
database is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
import uvicorn
from psycopg import sql

from api.app import create_app
from api.resources import ApiContext
from domain.family import Ok
from domain.ids import parse_job_id
from domain.jobs import CreateJob, JobCreated
from domain.jobs.sweeps import Range, Sweep
from domain.jobs.tasks import NEW, TaskBlock
from domain.spots import Claimed, ClaimTasks, Heartbeat, Hello, SpotRegistered
from eventstore.recorder import AsyncAppender
from eventstore.store import TadpoleStore
from service.bootstrap import bootstrap
from service.settings import Settings
from service.wiring import store_env
from service.writer import GroupCommitWriter, OutcomeUnknownError, StoreUnavailableError
from tests.integration.support import TcpProxy

pytestmark = pytest.mark.integration

TIMEOUT = 1.0  # TADPOLE_COMMAND_TIMEOUT in these tests
MARGIN = 3.0  # generous: the old writer took tens of seconds, or forever
SWEEP = Sweep("/a.jar", "M", ("PSO",), Range(1, 5, 1), Range(1, 1, 1), Range(1, 1, 1))


@dataclass
class Deployment:
    """One API process's writer, through the proxy, with a spot and a job of five NEW tasks."""

    proxy: TcpProxy
    writer: GroupCommitWriter
    appender: AsyncAppender
    direct: TadpoleStore  # the same store, not through the proxy: what was really stored
    spot: str
    job: UUID


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    opened = TcpProxy()
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def settings(proxy: TcpProxy) -> Iterator[Settings]:
    schema = f"it_outage_{uuid4().hex[:10]}"
    base = Settings().with_changes(store_schema=schema, command_timeout=TIMEOUT)
    yield base.with_changes(database_url=proxy.url(base.database_url))
    with psycopg.connect(base.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
async def deployment(proxy: TcpProxy, settings: Settings) -> AsyncIterator[Deployment]:
    tadpole = bootstrap(settings, run_reapers=False)
    await tadpole.start()  # opens the store, recovers and starts the writer
    assert isinstance(tadpole.writer, GroupCommitWriter) and tadpole.appender is not None
    writer, appender = tadpole.writer, tadpole.appender
    direct = TadpoleStore(store_env(settings.with_changes(database_url=Settings().database_url)))
    try:
        hello = await writer.submit(Hello("10.0.0.1"))
        assert isinstance(hello, SpotRegistered)
        job = await writer.submit(CreateJob(SWEEP))
        assert isinstance(job, JobCreated)
        yield Deployment(proxy, writer, appender, direct, hello.spot_id, parse_job_id(job.job_id))
    finally:
        proxy.restore()
        await tadpole.stop()
        direct.close()


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait on the event loop for ``predicate``; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def answered_within(bound: float, command: Any, d: Deployment) -> tuple[Any, float]:
    """Submit ``command``; its result or error and how long it took (failing past ``bound``)."""
    started = time.monotonic()
    try:
        result: Any = await asyncio.wait_for(d.writer.submit(command), bound)
    except TimeoutError:
        pytest.fail(f"{command} was not answered within {bound}s")
    except StoreUnavailableError as error:
        result = error
    return result, time.monotonic() - started


def stored_claims(d: Deployment) -> list[Any]:
    """Every claim event of the job's blocks, read straight from PostgreSQL."""
    job = d.direct.repository.get(d.job)
    return [
        e
        for block in job.block_ids()
        for e in d.direct.stored_events(block)
        if isinstance(e, TaskBlock.Claimed)
    ]


def stored_statuses(d: Deployment) -> list[str]:
    job = d.direct.repository.get(d.job)
    return [s for block in job.block_ids() for s in d.direct.repository.get(block).status]


async def back_up(d: Deployment) -> None:
    d.proxy.restore()
    await until(lambda: d.writer.ready, 30, "the writer to recover")


@pytest.mark.parametrize("mode", ["refuse", "hold"])
async def test_with_the_database_unreachable_commands_answer_503_within_the_deadline(
    deployment: Deployment, mode: str
) -> None:
    d = deployment
    assert d.writer.ready
    d.proxy.cut(mode)
    for command in (Heartbeat(d.spot, cpu_load=0.5), ClaimTasks(d.spot, 5), Hello("10.0.0.2")):
        result, took = await answered_within(TIMEOUT + MARGIN + 30, command, d)
        assert isinstance(result, StoreUnavailableError), result
        assert took < TIMEOUT + MARGIN, (command, took)
    assert not d.writer.ready
    await until(lambda: d.writer.down_since is not None, 30, "the outage to be noticed")
    _, took = await answered_within(TIMEOUT + MARGIN, ClaimTasks(d.spot, 5), d)
    assert took < 0.5  # known down: answered at once, not after a connect timeout

    await back_up(d)
    result, _ = await answered_within(30, ClaimTasks(d.spot, 5), d)
    assert isinstance(result, Claimed) and len(result.tasks) == 5
    assert len(stored_claims(d)) == 1


async def test_a_claim_queued_past_its_deadline_is_not_carried_out_when_the_database_returns(
    deployment: Deployment,
) -> None:
    d = deployment
    d.proxy.cut("hold")
    heartbeat = asyncio.ensure_future(d.writer.submit(Heartbeat(d.spot, cpu_load=0.5)))
    await until(lambda: d.writer.storing, 5, "the heartbeat's batch to be in flight")
    claim, took = await answered_within(TIMEOUT + MARGIN, ClaimTasks(d.spot, 5), d)
    assert isinstance(claim, StoreUnavailableError) and not isinstance(claim, OutcomeUnknownError)
    assert "not decided in time" in str(claim)  # withdrawn at its deadline, still queued
    assert took < TIMEOUT + MARGIN
    with pytest.raises(OutcomeUnknownError):  # the store never confirmed the heartbeat
        await asyncio.wait_for(heartbeat, TIMEOUT + MARGIN)

    await back_up(d)
    assert isinstance(await d.writer.submit(Heartbeat(d.spot, cpu_load=0.6)), Ok)
    assert stored_claims(d) == []
    assert stored_statuses(d) == [NEW] * 5


@pytest.fixture
async def http_port(deployment: Deployment) -> AsyncIterator[int]:
    """The API over uvicorn on this event loop, its commands going to the deployment's writer."""
    ctx = ApiContext(
        writer=deployment.writer,
        redis=None,  # type: ignore[arg-type]  # commands only
        postgres=None,  # type: ignore[arg-type]
        audit=None,  # type: ignore[arg-type]
        block_ids=lambda job: [],
        max_sweep_tasks=100,
        read_wait=1.0,
        spot_ids=lambda: [],
    )
    config = uvicorn.Config(
        create_app(ctx), host="127.0.0.1", port=0, lifespan="off", log_level="warning"
    )
    server = uvicorn.Server(config)
    serving = asyncio.ensure_future(server.serve())
    await until(lambda: server.started, 10, "uvicorn to start")
    yield server.servers[0].sockets[0].getsockname()[1]
    server.should_exit = True
    await asyncio.wait_for(serving, 10)


async def test_a_claim_whose_client_disconnected_while_queued_is_not_carried_out(
    deployment: Deployment, http_port: int
) -> None:
    d = deployment
    d.writer.timeout = 60.0  # only the client's departure may withdraw the claim
    d.proxy.cut("hold")
    heartbeat = asyncio.ensure_future(d.writer.submit(Heartbeat(d.spot, cpu_load=0.5)))
    await until(lambda: d.writer.storing, 5, "the heartbeat's batch to be in flight")

    _, client = await asyncio.open_connection("127.0.0.1", http_port)
    body = json.dumps({"spotId": d.spot, "maxTasks": 5}).encode()
    client.write(
        b"POST /internal/v1/tasks/claim HTTP/1.1\r\nHost: tadpole\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await client.drain()
    await until(lambda: d.writer._pending, 5, "the claim to be queued")
    (_, queued, _) = d.writer._pending[-1]
    client.close()  # the client gives up
    await until(queued.done, 5, "the claim to be withdrawn")
    assert "client went away" in str(queued.exception())
    with contextlib.suppress(StoreUnavailableError):
        await asyncio.wait_for(heartbeat, TIMEOUT + MARGIN)

    await back_up(d)
    assert isinstance(await d.writer.submit(Heartbeat(d.spot, cpu_load=0.6)), Ok)
    assert stored_claims(d) == []
    assert stored_statuses(d) == [NEW] * 5


def long_polls() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if "Claims._long_poll" in t.get_coro().__qualname__  # type: ignore[union-attr]
    ]


async def test_a_long_poll_whose_client_hung_up_claims_nothing_more(
    deployment: Deployment, http_port: int
) -> None:
    d = deployment
    other = await d.writer.submit(Hello("10.0.0.2"))
    assert isinstance(other, SpotRegistered)
    taken = await d.writer.submit(ClaimTasks(other.spot_id, 5))  # nothing left to claim
    assert isinstance(taken, Claimed) and len(taken.tasks) == 5

    _, client = await asyncio.open_connection("127.0.0.1", http_port)
    body = json.dumps({"spotId": d.spot, "maxTasks": 5, "waitMs": 20000}).encode()
    client.write(
        b"POST /internal/v1/tasks/claim HTTP/1.1\r\nHost: tadpole\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await client.drain()
    await until(lambda: long_polls(), 5, "the long poll to wait")
    client.close()  # the worker hangs up
    await until(lambda: not long_polls(), 5, "the long poll to notice")

    job = await d.writer.submit(CreateJob(SWEEP))
    assert isinstance(job, JobCreated)
    third = await d.writer.submit(Hello("10.0.0.3"))
    assert isinstance(third, SpotRegistered)
    got = await d.writer.submit(ClaimTasks(third.spot_id, 5))
    assert isinstance(got, Claimed) and len(got.tasks) == 5  # none went to the gone client
