"""The group-commit writer with a fake appender on the event loop (the API's hot path)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from domain.family import NotFoundError, Ok
from domain.jobs import CreateJob, FailTask, Finished, JobCreated, OpenJobs
from domain.jobs.sweeps import Range, Sweep
from domain.jobs.tasks import TaskBlock
from domain.processor import CommandProcessor
from domain.spots import Claimed, ClaimTasks, Heartbeat, Hello, LiveSpots, SpotRegistered
from domain.workflows import (
    Definition,
    RegisterWorkflow,
    RunStarted,
    StartRun,
    WorkflowRegistered,
)
from eventstore.store import StorePort, TadpoleStore, memory_env
from service.writer import (
    RETRY_FIRST,
    WAITING_RECHECK,
    GroupCommitWriter,
    OutcomeUnknownError,
    StoreUnavailableError,
)


class SnapshotsFail(StorePort):
    """A store port over a store that stores events but refuses every snapshot."""

    def __init__(self, store: TadpoleStore):
        super().__init__(store)
        self.refused = 0

        def refuse(snapshots: Sequence[Any]) -> None:
            self.refused += 1
            raise ConnectionError("the snapshot table is unreachable")

        assert store.snapshots is not None
        store.snapshots.put = refuse  # type: ignore[method-assign]


async def test_a_refused_snapshot_does_not_fail_a_stored_batch() -> None:
    store = TadpoleStore(memory_env())
    port = SnapshotsFail(store)
    processor = CommandProcessor(port, 3, 5.0)

    async def append(events: Sequence[Any], opened: Any, closed: Any) -> list[int]:
        return [r.notification.id for r in store.save(*events, opened=opened, closed=closed)]

    writer = GroupCommitWriter(processor, append=append)
    writer.start()
    try:
        hello = await writer.submit(Hello("10.0.0.1"))
        assert isinstance(hello, SpotRegistered)
        # Every heartbeat reports new figures, so each stores an event: the 100th
        # version of the spot comes with a snapshot, which the store refuses.
        for n in range(1, 101):
            answer = await writer.submit(Heartbeat(hello.spot_id, cpu_load=n / 1000))
            assert isinstance(answer, Ok), (n, answer)
        assert port.refused == 1
        assert not processor.needs_recovery
        spot = store.repository.get(
            processor.state(LiveSpots).spots[next(iter(processor.state(LiveSpots).spots))].id
        )
        assert spot.version == 101
    finally:
        await writer.stop()


# ---- deadlines, departed clients and a store that is down -------------------------------

SWEEP = Sweep("/a.jar", "M", ("PSO",), Range(1, 5, 1), Range(1, 1, 1), Range(1, 1, 1))


class FakeStore:
    """An appender and a probe over an in-memory store that a test can hold or take down."""

    def __init__(self, store: TadpoleStore):
        self.store = store
        self.open = asyncio.Event()
        self.open.set()
        self.error: Exception | None = None
        self.appended: list[Any] = []
        self.probes: list[float] = []
        self.held = 0
        #: Store the next append, then fail it: a commit whose answer was lost.
        self.lose_answer = False

    async def append(self, events: Sequence[Any], opened: Any, closed: Any) -> list[int]:
        if not self.open.is_set():
            self.held += 1
            await self.open.wait()
        if self.error is not None:
            raise self.error
        self.appended.extend(events)
        ids = [r.notification.id for r in self.store.save(*events, opened=opened, closed=closed)]
        if self.lose_answer:
            self.lose_answer = False
            raise ConnectionError("the connection was lost after the commit")
        return ids

    async def probe(self) -> None:
        self.probes.append(asyncio.get_running_loop().time())
        if self.error is not None:
            raise self.error


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    """Wait for ``predicate`` on the event loop; fail the test at the deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def spot_job() -> AsyncIterator[tuple[GroupCommitWriter, FakeStore, str]]:
    """A started writer (0.3 s command timeout) with a spot and a job of five NEW tasks."""
    store = TadpoleStore(memory_env())
    fake = FakeStore(store)
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    processor.recover(datetime.now(UTC))
    writer = GroupCommitWriter(processor, append=fake.append, timeout=0.3, probe=fake.probe)
    writer.start()
    hello = await writer.submit(Hello("10.0.0.1"))
    assert isinstance(hello, SpotRegistered)
    assert isinstance(await writer.submit(CreateJob(SWEEP)), JobCreated)
    try:
        yield writer, fake, hello.spot_id
    finally:
        await writer.stop()


def claimed(fake: FakeStore) -> list[Any]:
    return [e for e in fake.appended if isinstance(e, TaskBlock.Claimed)]


def new_tasks(writer: GroupCommitWriter) -> int:
    return sum(b.new_count() for b in writer.processor.state(OpenJobs).blocks.values())


async def test_a_command_still_queued_at_its_deadline_is_answered_503_and_never_decided(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    fake.open.clear()  # the store hangs: the next batch is stuck being stored
    stuck = asyncio.ensure_future(writer.submit(Heartbeat(spot, cpu_load=0.5)))
    await until(lambda: fake.held, 5, "the heartbeat's batch to be held")
    with pytest.raises(StoreUnavailableError) as refused:
        # Queued behind it until its deadline (the bound only keeps a broken writer from hanging).
        await asyncio.wait_for(writer.submit(ClaimTasks(spot, 5)), 5)
    assert not isinstance(refused.value, OutcomeUnknownError)  # nothing of it was stored
    fake.open.set()
    assert isinstance(await stuck, Ok)  # the batch in flight is answered when it is stored
    assert isinstance(await writer.submit(Heartbeat(spot, cpu_load=0.6)), Ok)
    assert claimed(fake) == [] and new_tasks(writer) == 5


async def test_a_command_found_past_its_deadline_when_the_batch_is_taken_is_not_decided(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    claim = asyncio.ensure_future(writer.submit(ClaimTasks(spot, 5)))
    await asyncio.sleep(0)  # the claim is queued and the writer woken
    # Something holds the event loop past the deadline (a slow load, say): the writer
    # then runs before the expiry timer does.
    time.sleep(writer.timeout + 0.05)
    with pytest.raises(StoreUnavailableError, match="not decided in time"):
        await asyncio.wait_for(claim, 5)
    assert claimed(fake) == [] and new_tasks(writer) == 5


async def test_a_command_whose_client_went_away_while_queued_is_never_decided(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    writer.timeout = 30.0  # only the departure can withdraw it
    fake.open.clear()
    stuck = asyncio.ensure_future(writer.submit(Heartbeat(spot, cpu_load=0.5)))
    await until(lambda: fake.held, 5, "the heartbeat's batch to be held")
    gone = asyncio.Event()
    claim = asyncio.ensure_future(writer.submit(ClaimTasks(spot, 5), gone.wait))
    await until(lambda: writer._background, 5, "the departure to be watched for")
    gone.set()  # the client disconnects
    with pytest.raises(StoreUnavailableError, match="client went away"):
        await asyncio.wait_for(claim, 5)
    fake.open.set()
    assert isinstance(await stuck, Ok)
    assert isinstance(await writer.submit(Heartbeat(spot, cpu_load=0.6)), Ok)
    assert claimed(fake) == [] and new_tasks(writer) == 5


async def test_a_command_answered_at_once_never_starts_a_watcher(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    asked: list[str] = []

    async def disconnected() -> None:
        asked.append("watched")
        await asyncio.Event().wait()

    answer = await writer.submit(ClaimTasks(spot, 2), disconnected)
    assert isinstance(answer, Claimed) and len(answer.tasks) == 2
    assert asked == [] and not writer._background
    assert len(claimed(fake)) == 1


async def test_while_the_store_is_down_commands_fail_fast_and_it_is_probed_with_backoff(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    assert writer.ready
    fake.error = ConnectionError("connection refused")
    with pytest.raises(StoreUnavailableError):
        await writer.submit(Heartbeat(spot, cpu_load=0.5))
    assert not writer.ready
    await until(lambda: len(fake.probes) >= 4, 10, "four probes of the store")
    assert writer.down_since is not None
    appended = len(fake.appended)
    with pytest.raises(StoreUnavailableError, match="unreachable since"):
        await writer.submit(ClaimTasks(spot, 5))  # answered without being queued
    assert writer._pending == []
    gaps = [b - a for a, b in itertools.pairwise(fake.probes)]
    assert gaps[0] >= RETRY_FIRST * 0.9 and gaps[-1] >= 3 * RETRY_FIRST, gaps  # growing pauses

    fake.error = None  # the store is back
    await until(lambda: writer.ready, 10, "the writer to recover")
    assert writer.down_since is None
    assert isinstance(await writer.submit(Heartbeat(spot, cpu_load=0.6)), Ok)
    assert len(fake.appended) == appended + 1 and claimed(fake) == []


async def test_a_batch_the_store_did_not_confirm_in_time_has_an_unknown_outcome(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    fake.error = TimeoutError("the database did not answer within 0.3s")
    with pytest.raises(OutcomeUnknownError):
        await writer.submit(ClaimTasks(spot, 5))
    fake.error = None
    # Reloaded from the store, which has no claim: the tasks are NEW again.
    await until(lambda: writer.ready, 10, "the writer to reload")
    assert new_tasks(writer) == 5


async def test_a_claim_stored_but_not_answered_is_released_once_the_writer_reloads(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    fake.lose_answer = True
    with pytest.raises(StoreUnavailableError):
        await writer.submit(ClaimTasks(spot, 3))
    assert len(claimed(fake)) == 1  # stored all the same: three tasks RUNNING under spot
    # Reloaded, the writer releases them: the spot was told 503 and never got them.
    await until(lambda: new_tasks(writer) == 5, 10, "the unanswered claim to be released")
    (released,) = [e for e in fake.appended if isinstance(e, TaskBlock.Reaped)]
    assert (released.reason, released.holders) == ("claim answer lost", [spot] * 3)
    again = await writer.submit(ClaimTasks(spot, 5))
    assert isinstance(again, Claimed) and len(again.tasks) == 5  # claimable at once


async def test_a_failed_claim_that_was_not_stored_releases_nothing(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, fake, spot = spot_job
    fake.error = ConnectionError("refused before the commit")
    with pytest.raises(StoreUnavailableError):
        await writer.submit(ClaimTasks(spot, 2))
    fake.error = None
    await until(lambda: writer.ready, 10, "the writer to reload")
    taken = await writer.submit(ClaimTasks(spot, 2))
    assert isinstance(taken, Claimed) and len(taken.tasks) == 2
    await until(lambda: not writer._unanswered, 10, "the release to be decided")
    assert [e for e in fake.appended if isinstance(e, TaskBlock.Reaped)] == []
    assert new_tasks(writer) == 3  # the new claim holds: the old one's release touched nothing


# ---- long-polling claims ----------------------------------------------------------------


async def test_a_task_that_becomes_claimable_wakes_one_waiting_claim_the_longest_waiting(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, _, spot = spot_job
    taken = await writer.submit(ClaimTasks(spot, 5))
    assert isinstance(taken, Claimed) and len(taken.tasks) == 5  # nothing claimable now
    woken: list[int] = []

    async def wait(n: int) -> None:  # as a long-polling claim: woken, it claims
        await writer.wait_for_work(timeout=5.0)
        woken.append(n)
        got = await writer.submit(ClaimTasks(spot, 1))
        assert isinstance(got, Claimed) and len(got.tasks) == 1

    waiters = [asyncio.ensure_future(wait(n)) for n in range(3)]
    await until(lambda: len(writer._waiting) == 3, 2, "three claims to wait")
    await asyncio.sleep(2 * WAITING_RECHECK)  # rechecks find nothing: nobody is woken
    assert woken == []
    first = taken.tasks[0]
    again = await writer.submit(FailTask(first.task_id, spot, first.fence, "flaky", True))
    assert isinstance(again, Finished) and again.will_retry  # NEW again: one task claimable
    await until(lambda: woken, 2, "a claim to be woken")
    await asyncio.sleep(2 * WAITING_RECHECK)  # the task is taken: no other claim is woken
    assert woken == [0]
    assert waiters[0].done() and waiters[0].exception() is None
    for waiter in waiters:
        waiter.cancel()


async def test_a_waiting_claim_is_woken_for_no_task_when_it_times_out(
    spot_job: tuple[GroupCommitWriter, FakeStore, str],
) -> None:
    writer, _, spot = spot_job
    assert isinstance(await writer.submit(ClaimTasks(spot, 5)), Claimed)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await writer.wait_for_work(timeout=0.3)
    assert loop.time() - began >= 0.3
    assert not writer._waiting


# ---- looking up, off the loop, what a batch may load --------------------------------------


class CountingLoads(StorePort):
    """A store port that counts the aggregates the processor reads synchronously."""

    def __init__(self, store: TadpoleStore):
        super().__init__(store)
        self.loads: list[Any] = []

    def load(self, uuid: Any) -> Any:
        self.loads.append(uuid)
        return super().load(uuid)


async def test_a_new_runs_idempotency_check_is_looked_up_off_the_loop() -> None:
    store = TadpoleStore(memory_env())
    port = CountingLoads(store)
    processor = CommandProcessor(port, 3, 5.0)
    processor.recover(datetime.now(UTC))
    fake = FakeStore(store)
    asked: list[list[Any]] = []

    async def look_up(ids: Sequence[Any]) -> set[Any]:
        asked.append(list(ids))
        return {u for u in ids if store.load(u) is not None}

    writer = GroupCommitWriter(processor, append=fake.append, look_up=look_up)
    writer.start()
    try:
        release = Definition.from_dict(
            {"namespace": "ops", "name": "release", "version": "1", "tasks": [{"id": "a"}]}
        )
        assert isinstance(await writer.submit(RegisterWorkflow(release)), WorkflowRegistered)
        port.loads.clear()
        first = await writer.submit(StartRun("ops", "release", "r1", "{}"))
        assert isinstance(first, RunStarted) and first.created
        assert port.loads == []  # neither the new run nor the (held) definition was read
        assert asked[-1] == [first.instance_id]
        # The run leaves memory (here: a restart): a duplicate start finds it stored.
        processor.invalidate()
        again = await writer.submit(StartRun("ops", "release", "r1", "{}"))
        assert again == RunStarted(first.instance_id, created=False)
    finally:
        await writer.stop()


async def test_a_failed_look_up_answers_503_and_the_writer_reloads() -> None:
    store = TadpoleStore(memory_env())
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    fake = FakeStore(store)
    broken = True

    async def look_up(ids: Sequence[Any]) -> set[Any]:
        if broken:
            raise ConnectionError("the store went away")
        return {u for u in ids if store.load(u) is not None}

    writer = GroupCommitWriter(processor, append=fake.append, look_up=look_up, probe=fake.probe)
    writer.start()
    try:
        with pytest.raises(StoreUnavailableError, match="the store went away"):
            await writer.submit(StartRun("ops", "release", "r1", "{}"))
        assert fake.appended == []
        broken = False
        await until(lambda: writer.ready, 5.0, "the writer to reload")
        answer = await writer.submit(StartRun("ops", "release", "r1", "{}"))
        assert isinstance(answer, NotFoundError)  # decided now: nothing is registered
    finally:
        await writer.stop()
