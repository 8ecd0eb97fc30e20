"""The event store's one-round-trip recorder against the real PostgreSQL.

It must keep every promise of the library's own recorder: atomic appends with
optimistic concurrency, the notification ids returned in order, the channel
notified, and the ``EXCLUSIVE`` table lock that makes commit order equal
notification order.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from uuid import uuid4

import psycopg
import pytest
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError
from psycopg import sql

from domain.jobs import CompleteTask, CreateJob, Finished, JobCreated
from domain.jobs.sweeps import Range, Sweep
from domain.jobs.tasks import Outcome
from domain.processor import CommandProcessor
from domain.spots import Claimed, ClaimTasks, Hello, SpotRegistered
from eventstore.recorder import AsyncAppender, OneTripRecorder
from eventstore.store import StorePort, TadpoleStore
from service.settings import Settings
from service.wiring import open_store
from service.writer import GroupCommitWriter, StoreUnavailableError
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

DATABASE_URL = Settings().database_url
SWEEP_OF_3 = Sweep("/j.jar", "M", ("PSO",), Range(1, 3, 1), Range(1, 1, 1), Range(1, 1, 1))


class Note(Aggregate):
    def __init__(self, text: str):
        self.text = text

    def edit(self, text: str) -> None:
        self.trigger_event(self.Edited, text=text)

    class Edited(Aggregate.Event):
        text: str

        def apply(self, aggregate: Aggregate) -> None:
            aggregate.text = self.text  # type: ignore[attr-defined]


@pytest.fixture
def store() -> Iterator[TadpoleStore]:
    schema = f"it_store_{uuid4().hex[:10]}"
    opened = open_store(Settings().with_changes(store_schema=schema))
    try:
        yield opened
    finally:
        opened.close()
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def events_table(store: TadpoleStore) -> sql.Composed:
    recorder = store.recorder
    assert isinstance(recorder, OneTripRecorder)
    return sql.SQL("{}.{}").format(
        sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name)
    )


def test_the_store_appends_through_the_one_trip_recorder(store: TadpoleStore) -> None:
    assert isinstance(store.recorder, OneTripRecorder)
    a, b = Note("a"), Note("b")
    b.edit("b2")
    recordings = store.save(a, b)
    ids = [r.notification.id for r in recordings]
    assert ids == sorted(ids) and len(set(ids)) == 3
    stored = store.recorder.select_notifications(1, 10)
    assert [n.id for n in stored] == ids
    assert [(n.originator_id, n.originator_version) for n in stored] == [
        (a.id, 1),
        (b.id, 1),
        (b.id, 2),
    ]
    again = store.repository.get(b.id)
    assert isinstance(again, Note) and again.text == "b2"


def test_a_stale_version_stores_nothing_of_its_append(store: TadpoleStore) -> None:
    note = Note("first")
    store.save(note)
    rival = store.repository.get(note.id)
    note.edit("mine")
    store.save(note)
    rival.edit("theirs")  # also version 2
    fresh = Note("would be new")
    with pytest.raises(IntegrityError):
        store.save(fresh, rival)
    assert store.recorder.max_notification_id() == 2
    assert [n.originator_id for n in store.recorder.select_notifications(1, 10)] == [
        note.id,
        note.id,
    ]


def test_an_append_takes_the_exclusive_table_lock(store: TadpoleStore) -> None:
    """A writer holding the lock makes the append wait: commit order is notification order."""
    appended = threading.Event()
    with psycopg.connect(DATABASE_URL) as holder:
        holder.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(events_table(store)))
        thread = threading.Thread(target=lambda: (store.save(Note("x")), appended.set()))
        thread.start()
        wait_for(
            lambda: holder.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE c.relname = %s AND l.mode = 'ExclusiveLock' AND NOT l.granted",
                (store.recorder.events_table_name,),  # type: ignore[attr-defined]
            ).fetchone()[0],  # type: ignore[index]
            10,
            "the append to wait for the table lock",
        )
        assert not appended.is_set()
        holder.rollback()
    thread.join(10)
    assert appended.is_set()
    assert store.recorder.max_notification_id() == 1


def test_an_append_notifies_the_channel(store: TadpoleStore) -> None:
    recorder = store.recorder
    assert isinstance(recorder, OneTripRecorder)
    with psycopg.connect(DATABASE_URL, autocommit=True) as listener:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(recorder.channel_name)))
        store.save(Note("heard"))
        heard = list(listener.notifies(timeout=5, stop_after=1))
    # The channel is the database's, shared by every store schema: appends of other
    # runs on this machine may be heard too (several notifications may come at once).
    assert heard and {n.channel for n in heard} == {recorder.channel_name}


# ---- the writer's appender, on the event loop -----------------------------------------


@pytest.fixture
async def appender(store: TadpoleStore) -> AsyncIterator[AsyncAppender]:
    opened = AsyncAppender(store, DATABASE_URL)
    try:
        yield opened
    finally:
        await opened.close()


def cut_connection(appender: AsyncAppender) -> int:
    """Terminate the appender's server connection (a database restart, a network cut)."""
    assert appender.conn is not None
    backend = appender.conn.info.backend_pid
    with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend,))
    return backend


async def test_the_async_appender_stores_what_the_library_reads(
    store: TadpoleStore, appender: AsyncAppender
) -> None:
    note = Note("one")
    note.edit("two")
    ids = await appender.append(note.collect_events())
    assert ids == [1, 2]
    again = store.repository.get(note.id)
    assert isinstance(again, Note) and (again.text, again.version) == ("two", 2)

    rival = store.repository.get(note.id)
    note.edit("mine")
    await appender.append(note.collect_events())
    rival.edit("theirs")  # also version 3
    fresh = Note("would be new")
    with pytest.raises(psycopg.IntegrityError):
        await appender.append([*fresh.collect_events(), *rival.collect_events()])
    assert store.recorder.max_notification_id() == 3


async def test_the_async_appender_tells_which_aggregates_exist(
    store: TadpoleStore, appender: AsyncAppender
) -> None:
    kept, never = Note("kept"), Note("never stored")
    kept.edit("twice")
    await appender.append(kept.collect_events())
    assert await appender.existing([kept.id, never.id]) == {kept.id}
    assert await appender.existing([]) == set()
    cut_connection(appender)  # a broken connection is replaced here too
    assert await appender.existing([never.id, kept.id]) == {kept.id}


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/postgres"  # nothing listens on port 1


def stored_texts(store: TadpoleStore) -> list[str]:
    return [
        store.repository.get(n.originator_id).text  # type: ignore[attr-defined]
        for n in store.recorder.select_notifications(1, 10)
    ]


async def test_the_async_appender_replaces_a_broken_connection_and_tries_again(
    store: TadpoleStore, appender: AsyncAppender
) -> None:
    await appender.append(Note("before").collect_events())
    backend = cut_connection(appender)  # say, PostgreSQL restarted while the writer idled
    assert await appender.append(Note("after the cut").collect_events())
    assert appender.conn is not None and appender.conn.info.backend_pid != backend
    assert stored_texts(store) == ["before", "after the cut"]


async def test_the_async_appender_raises_when_the_database_stays_away(
    store: TadpoleStore, appender: AsyncAppender
) -> None:
    await appender.append(Note("before").collect_events())
    cut_connection(appender)
    appender.conninfo = UNREACHABLE
    with pytest.raises(psycopg.OperationalError):
        await appender.append(Note("lost").collect_events())
    appender.conninfo = DATABASE_URL  # it came back
    await appender.append(Note("after").collect_events())
    assert stored_texts(store) == ["before", "after"]


async def test_the_writer_appends_on_the_loop_and_recovers_from_a_refused_batch(
    store: TadpoleStore, appender: AsyncAppender
) -> None:
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    writer = GroupCommitWriter(processor, append=appender.append)
    writer.start()
    try:
        hello = await writer.submit(Hello("10.0.0.1"))
        assert isinstance(hello, SpotRegistered)
        sweep = Sweep("/a.jar", "M", ("PSO",), Range(1, 3, 1), Range(1, 1, 1), Range(1, 1, 1))
        job = await writer.submit(CreateJob(sweep))
        assert isinstance(job, JobCreated)
        claimed = await writer.submit(ClaimTasks(hello.spot_id, 2))
        assert isinstance(claimed, Claimed) and len(claimed.tasks) == 2
        first = claimed.tasks[0]
        done = await writer.submit(
            CompleteTask(first.task_id, hello.spot_id, first.fence, 1, 1, 0.5, None)
        )
        assert isinstance(done, Finished) and done.outcome is Outcome.ACCEPTED
        stored = store.recorder.max_notification_id()

        cut_connection(appender)
        appender.conninfo = UNREACHABLE
        second = claimed.tasks[1]
        with pytest.raises(StoreUnavailableError):
            await writer.submit(
                CompleteTask(second.task_id, hello.spot_id, second.fence, 1, 1, 0.5, None)
            )
        assert store.recorder.max_notification_id() == stored
        assert processor.needs_recovery  # what it decided for that batch is forgotten
        appender.conninfo = DATABASE_URL

        again = await writer.submit(
            CompleteTask(second.task_id, hello.spot_id, second.fence, 1, 1, 0.5, None)
        )
        assert isinstance(again, Finished) and again.outcome is Outcome.ACCEPTED
        assert store.recorder.max_notification_id() > stored
    finally:
        await writer.stop()


# ---- the index of open work ------------------------------------------------------------


def open_table(store: TadpoleStore) -> sql.Composed:
    recorder = store.recorder
    assert isinstance(recorder, OneTripRecorder)
    return sql.SQL("{}.{}").format(
        sql.Identifier(recorder.datastore.schema),
        sql.Identifier(f"{recorder.events_table_name}_open"),
    )


async def test_the_index_of_open_work_changes_in_the_appends_own_statement(
    store: TadpoleStore, appender: AsyncAppender
) -> None:
    assert store.open_aggregates() == {}  # a new store's index is built from the start
    a, b = Note("a"), Note("b")
    await appender.append([*a.collect_events(), *b.collect_events()], {a.id: "Note", b.id: "Note"})
    assert store.open_aggregates() == {a.id: "Note", b.id: "Note"}
    a.edit("closed")
    await appender.append(a.collect_events(), {}, [a.id])
    assert store.open_aggregates() == {b.id: "Note"}
    # A refused append changes the index no more than the events.
    rival = store.repository.get(b.id)
    b.edit("mine")
    await appender.append(b.collect_events())
    rival.edit("theirs")
    with pytest.raises(psycopg.errors.IntegrityError):
        await appender.append(rival.collect_events(), {}, [b.id])
    assert store.open_aggregates() == {b.id: "Note"}


def test_a_store_from_before_the_index_has_it_built_once_by_the_writer(
    store: TadpoleStore,
) -> None:
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    now = datetime.now(UTC)
    spot, job = processor.process([Hello("10.0.0.1"), CreateJob(SWEEP_OF_3)], now)
    assert isinstance(spot, SpotRegistered) and isinstance(job, JobCreated)
    expected = store.open_aggregates()
    assert expected is not None and sorted(expected.values()) == ["Spot", "TaskBlock"]
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DELETE FROM {}").format(open_table(store)))  # as an older version
    assert store.open_aggregates() is None
    restarted = CommandProcessor(StorePort(store), 3, 5.0)
    restarted.recover(now)
    assert store.open_aggregates() == expected
    (claimed,) = restarted.process([ClaimTasks(spot.spot_id, 3)], now)
    assert isinstance(claimed, Claimed) and len(claimed.tasks) == 3
