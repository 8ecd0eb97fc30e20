"""The event store's PostgreSQL recorder, with each append one round trip.

``eventsourcing``'s :class:`~eventsourcing.postgres.PostgresApplicationRecorder`
appends in a pipelined transaction: ``BEGIN``, ``SET LOCAL lock_timeout``,
``LOCK TABLE … IN EXCLUSIVE MODE``, ``NOTIFY``, the ``INSERT`` of an array of
composite values, a sync for its notification ids, then ``COMMIT``: two round
trips and a good deal of Python to dump the composites. Every task state change
waits for an append (the group-commit writer stores one batch at a time), so
the append is the hot path's critical section. Measured on the benchmark's
2-core machine under load: 4.6 ms of wall time per append, of which 1.35 ms was
the thread's own CPU.

This recorder does the same in one statement: a PL/pgSQL function that takes the
same ``EXCLUSIVE`` table lock (so commit order stays notification order, which
the relay and the projections' catch-up rely on: never the library's own
``POSTGRES_ENABLE_DB_FUNCTIONS`` function, which skips it), notifies the same
channel, and inserts four plain arrays, returning the notification ids. Called in
autocommit mode it is its own transaction. The table, its rows and every read
are the library's, unchanged.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from eventsourcing.persistence import InterfaceError, OperationalError, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresDatastore
from eventsourcing.utils import retry
from psycopg.sql import SQL, Identifier, Literal

#: ``APPLICATION_RECORDER_TOPIC`` for ``eventsourcing``: this recorder.
TOPIC = f"{__name__}:OneTripRecorder"

_T = TypeVar("_T")

#: The index of open work's mark that it is built (a row no aggregate can have).
BUILT = UUID(int=0)
BUILT_KIND = "*built*"


class OneTripRecorder(PostgresApplicationRecorder):
    """Appends with one statement; everything else is the library's recorder."""

    def __init__(self, datastore: PostgresDatastore, *, events_table_name: str = "stored_events"):
        super().__init__(datastore, events_table_name=events_table_name)
        function = f"{events_table_name}_append"
        self.check_identifier_length(function)
        names: dict[str, Any] = {
            "schema": Identifier(datastore.schema),
            "table": Identifier(events_table_name),
            "function": Identifier(function),
            "id_type": Identifier(datastore.originator_id_type),
            "channel": Identifier(self.channel_name),
            "lock_timeout": Literal(f"{datastore.lock_timeout}s"),
        }
        open_table = f"{events_table_name}_open"
        self.check_identifier_length(open_table)
        names["open"] = Identifier(open_table)
        self.sql_create_statements += [
            # The index of open work (see domain.processor): changed in the very
            # statement that appends the events that open or close the work.
            SQL(
                "CREATE TABLE IF NOT EXISTS {schema}.{open} ("
                "id {id_type} PRIMARY KEY, kind text NOT NULL)"
            ).format(**names),
            # Built from the start in a store that has no events yet; a store written
            # before there was an index gets it built once, by the writer.
            SQL(
                "INSERT INTO {schema}.{open} SELECT {built}::{id_type}, {built_kind} "
                "WHERE NOT EXISTS (SELECT FROM {schema}.{table}) ON CONFLICT DO NOTHING"
            ).format(**names, built=Literal(str(BUILT)), built_kind=Literal(BUILT_KIND)),
            SQL(
                "CREATE OR REPLACE FUNCTION {schema}.{function}("
                "ids {id_type}[], versions bigint[], topics text[], states bytea[], "
                "open_ids {id_type}[], open_kinds text[], closed_ids {id_type}[]) "
                "RETURNS SETOF bigint LANGUAGE plpgsql AS $body$ "
                "BEGIN "
                "PERFORM set_config('lock_timeout', {lock_timeout}, true); "
                "LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE; "
                "NOTIFY {channel}; "
                "RETURN QUERY INSERT INTO {schema}.{table} "
                "(originator_id, originator_version, topic, state) "
                "SELECT * FROM unnest(ids, versions, topics, states) "
                "RETURNING notification_id; "
                # Most appends open and close nothing: then the index is not touched.
                "IF cardinality(open_ids) > 0 THEN "
                "INSERT INTO {schema}.{open} SELECT * FROM unnest(open_ids, open_kinds) "
                "ON CONFLICT (id) DO NOTHING; END IF; "
                "IF cardinality(closed_ids) > 0 THEN "
                "DELETE FROM {schema}.{open} WHERE id = ANY(closed_ids); END IF; "
                "END $body$"
            ).format(**names),
        ]
        self.append_statement = SQL(
            "SELECT * FROM {schema}.{function}(%s::{id_type}[], %s::bigint[], %s::text[], "
            "%s::bytea[], %s::{id_type}[], %s::text[], %s::{id_type}[])"
        ).format(**names)
        self.select_existing_statement = SQL(
            "SELECT DISTINCT originator_id FROM {schema}.{table} "
            "WHERE originator_id = ANY(%s::{id_type}[])"
        ).format(**names)
        self.select_open_statement = SQL("SELECT id, kind FROM {schema}.{open}").format(**names)
        self.replace_open_statements = (
            SQL("LOCK TABLE {schema}.{table} IN EXCLUSIVE MODE").format(**names),
            SQL("DELETE FROM {schema}.{open}").format(**names),
            SQL(
                "INSERT INTO {schema}.{open} SELECT * FROM unnest(%s::{id_type}[], %s::text[])"
            ).format(**names),
        )
        self.append_column = function

    @retry((InterfaceError, OperationalError), max_attempts=10, wait=0.2)
    def insert_events(
        self,
        stored_events: Sequence[StoredEvent],
        *,
        opened: Mapping[Any, str] | None = None,
        closed: Sequence[Any] = (),
        **kwargs: Any,
    ) -> Sequence[int] | None:
        if not stored_events:
            return []
        params = _columns(stored_events, opened or {}, closed)
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.append_statement, params, prepare=True)
            return [row[self.append_column] for row in curs.fetchall()]

    def open_aggregates(self) -> dict[UUID, str] | None:
        """The index of open work; None until it was built."""
        with self.datastore.get_connection() as conn, conn.cursor() as curs:
            curs.execute(self.select_open_statement)
            rows = {UUID(str(row["id"])): row["kind"] for row in curs.fetchall()}
        if rows.pop(BUILT, None) is None:
            return None
        return rows

    def build_open_index(self, opened: Mapping[UUID, str]) -> None:
        """Replace the index with ``opened``, marked built (appends wait meanwhile)."""
        lock, delete, insert = self.replace_open_statements
        ids = [BUILT, *opened]
        kinds = [BUILT_KIND, *opened.values()]
        with self.datastore.transaction(commit=True) as curs:
            curs.execute(lock)
            curs.execute(delete)
            curs.execute(insert, (ids, kinds))


class AsyncAppender:
    """The recorder's append on an asyncio connection: the group-commit writer's hot path.

    The writer used to hand each append to a worker thread and wait to be handed
    back: under load that hand-off alone was 1.6 ms of a ~6 ms cycle, and the
    thread fought the event loop for the GIL. Awaiting the same statement on the
    loop costs neither, and the loop serves HTTP while PostgreSQL works. Events
    are transcoded by the store's own mapper, exactly as
    :meth:`eventsourcing.application.Application.save` would.

    Every call answers within ``timeout`` seconds, connecting included: past it,
    it raises :class:`TimeoutError` and leaves the connection behind (psycopg
    asks the server to cancel the statement and closes it in the background,
    which can take seconds more when the server is out of reach).
    """

    def __init__(self, store: Any, conninfo: str, timeout: float = 10.0):
        recorder = store.recorder
        if not isinstance(recorder, OneTripRecorder):
            raise TypeError("AsyncAppender needs the store's OneTripRecorder")
        self.recorder = recorder
        self.mapper = store.mapper
        self.conninfo = conninfo
        self.timeout = timeout
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self._abandoned: set[asyncio.Task[Any]] = set()

    async def append(
        self,
        events: Sequence[Any],
        opened: Mapping[Any, str] | None = None,
        closed: Sequence[Any] = (),
    ) -> list[int]:
        """Store ``events`` atomically, with the changes to the index of open work;
        their notification ids.

        A connection found broken (the server restarted while it idled) is
        replaced and the append tried once more. That is safe even when the first
        try was committed before the connection broke: the retry then finds
        those versions taken and raises ``IntegrityError``, and the writer
        reloads from the store.
        """
        stored = [self.mapper.to_stored_event(e) for e in events]
        return await self._bounded(self._append(_columns(stored, opened or {}, closed)))

    async def existing(self, ids: Sequence[UUID]) -> set[UUID]:
        """Which of these aggregates the store has (any event of theirs)."""
        rows = await self._bounded(
            self._rows(self.recorder.select_existing_statement, (list(ids),))
        )
        return {UUID(str(row[0])) for row in rows}

    async def ping(self) -> None:
        """Return when the database answers; raise when it cannot be reached in time."""
        await self._bounded(self._ping())

    async def _append(self, params: tuple[list[Any], ...]) -> list[int]:
        return [row[0] for row in await self._rows(self.recorder.append_statement, params)]

    async def _rows(self, statement: Any, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The rows ``statement`` returns; a connection found broken is replaced and the
        statement tried once more (see :meth:`append`)."""
        for attempt in (1, 2):
            conn = await self._connection()
            try:
                cursor = await conn.execute(statement, params, prepare=True)
                return await cursor.fetchall()
            except (psycopg.OperationalError, psycopg.InterfaceError):
                await self._drop(conn)
                if attempt == 2:
                    raise
            except BaseException:  # cancelled past the deadline: the connection is spent
                await self._drop(conn)
                raise
        raise AssertionError("unreachable")

    async def _ping(self) -> None:
        conn = await self._connection()
        try:
            await conn.execute("SELECT 1")
        except BaseException:
            await self._drop(conn)
            raise

    async def _bounded(self, work: Coroutine[Any, Any, _T]) -> _T:
        """Await ``work`` for at most ``timeout`` seconds.

        On a timeout ``work`` is cancelled but not waited for: psycopg's cleanup
        of a cancelled statement (a cancel request, then a wait for the server)
        is itself unbounded when the server is out of reach.
        """
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as stopped:
            self.conn = None  # the next call connects afresh, not behind the stuck one
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(self._forget)
            if isinstance(stopped, TimeoutError):
                raise TimeoutError(f"the database did not answer within {self.timeout}s") from None
            raise

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: it was already reported as the timeout

    async def _connection(self) -> psycopg.AsyncConnection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = await psycopg.AsyncConnection.connect(
                self.conninfo,
                autocommit=True,
                connect_timeout=max(2, math.ceil(self.timeout)),  # libpq's least is 2
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        return self.conn

    async def _drop(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.conn is conn:
            self.conn = None
        await conn.close()

    async def close(self) -> None:
        for task in list(self._abandoned):
            task.cancel()
        if self.conn is not None:
            await self.conn.close()
            self.conn = None


def _columns(
    stored: Sequence[StoredEvent], opened: Mapping[Any, str], closed: Sequence[Any]
) -> tuple[list[Any], ...]:
    return (
        [e.originator_id for e in stored],
        [e.originator_version for e in stored],
        [e.topic for e in stored],
        [e.state for e in stored],
        list(opened),
        list(opened.values()),
        list(closed),
    )
