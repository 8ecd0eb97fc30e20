"""The relay: the only producer of domain events. Store → Avro → Kafka.

It reads the store's notification log after its tracked position, produces each
event with the idempotent producer (key = aggregate id, so an aggregate's events
stay in order on one partition), waits for every delivery, and only then records
the new position in PostgreSQL. Killed at any point, it re-sends at most the
batch it was on; consumers ignore what they have already applied.

A broker that comes back empty (the embedded one keeps nothing) is handled by
creating the topics again and replacing the producer: an idempotent producer
that outlived the broker's state never recovers (it times out, never fatally)
and its "deliveries" to the new broker may be dropped, so the producer is
replaced as soon as it reports the broker gone, and after any failed batch. What
the empty broker lost is not re-sent: the projections heal from the store.

An event that cannot be encoded, or that the broker refuses for good (larger
than its message size, say), is dead-lettered (:mod:`streaming.deadletters`)
and the relay goes on with the next one: consumers see a gap for that aggregate
and read its events from the store. ``tadpole dead-letters retry`` asks the relay
to produce it again once the cause is fixed. With the event store unreachable
the relay waits and retries with growing pauses instead of exiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from uuid import UUID

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import Notification
from eventsourcing.persistence import OperationalError as StoreOperationalError
from psycopg import sql

from eventstore.store import TadpoleStore
from schemas.codec import EPOCH, Codec, EventMessage, message_from_event
from streaming.backoff import Backoff
from streaming.consumer import IDLE_FLUSH, LagRecorder
from streaming.deadletters import RELAY, DeadLetters
from streaming.topics import TopicCatalogue, ensure_topics, producer_config

log = logging.getLogger(__name__)

BATCH = 1000
#: Longest a caught-up relay waits for an append's notification before it looks
#: again (and notices a stop, or a dead letter to re-send).
IDLE_WAKE = 0.5
#: How long a woken relay lets appends gather before it reads them: the events of
#: a few batches go out as one produce request, and the broker and the projectors
#: see one round of requests for them instead of one each.
GATHER = 0.01
#: Dead letters someone asked to re-send are looked for this often (s).
RETRY_EVERY = 2.0
#: Broker answers that no retry can change: the message itself is refused.
REFUSED = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_MSG_SIZE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
        KafkaError._INVALID_ARG,
    }
)
#: The event store or the position table is away: wait and retry.
STORE_DOWN = (
    StoreOperationalError,
    StoreInterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
#: The type of a placeholder for a stored event the relay could not read.
UNREADABLE = "unreadable"


class RelayPosition:
    """The relay's position in the notification log, in PostgreSQL."""

    def __init__(self, conninfo: str, schema: str, name: str = "relay"):
        self.conninfo = conninfo
        self.schema = schema
        self.table = sql.Identifier(schema, "relay_position")
        self.name = name
        self._conn: psycopg.Connection[Any] | None = None

    def _connect(self) -> psycopg.Connection[Any]:
        # A position lost in a crash only means re-sending a batch (consumers
        # ignore duplicates), so its commits need not wait for the WAL flush.
        conn = psycopg.connect(
            self.conninfo,
            autocommit=True,
            connect_timeout=5,
            options="-c synchronous_commit=off",
        )
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)))
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, position bigint NOT NULL)"
            ).format(self.table)
        )
        return conn

    @property
    def conn(self) -> psycopg.Connection[Any]:
        """The connection: opened on first use, and anew once the last one closed."""
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _one(self, statement: sql.Composed, params: tuple[Any, ...]) -> Any:
        """Run a statement (on a new connection if the last one broke); its first row."""
        conn = self.conn
        try:
            return conn.execute(statement, params).fetchone()
        except psycopg.OperationalError:
            conn.close()
            raise

    def get(self) -> int:
        row = self._one(
            sql.SQL("SELECT position FROM {} WHERE name = %s").format(self.table), (self.name,)
        )
        return int(row[0]) if row else 0

    def set(self, position: int) -> None:
        self._one(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, %s) ON CONFLICT (name) "
                "DO UPDATE SET position = EXCLUDED.position RETURNING position"
            ).format(self.table),
            (self.name, position),
        )

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


class StoreWakeups:
    """Waits for the store's next append instead of polling its log.

    Every append notifies the recorder's channel (see
    :mod:`eventstore.recorder`); this listens on its own connection. It listens
    before the relay's first read, so an append committed between a read that
    found nothing and the wait still wakes it. When the connection breaks it
    waits for the store (or the fallback pause) like a poll would, and listens
    again next time.
    """

    def __init__(self, conninfo: str, channel: str, stopping: threading.Event | None = None):
        self.conninfo = conninfo
        self.channel = channel
        self.stopping = stopping or threading.Event()
        self._conn: psycopg.Connection[Any] | None = None

    def listen(self) -> None:
        """Listen from now on (before the first read)."""
        if self._conn is None or self._conn.closed:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=5)
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            self._conn = conn

    def wait(self, timeout: float) -> bool:
        """Return once the store was appended to since the last wait (True), or after
        ``timeout`` seconds (False)."""
        try:
            self.listen()
            assert self._conn is not None
            woken = any(True for _ in self._conn.notifies(timeout=timeout, stop_after=1))
            if woken:  # one read serves every append notified so far
                for _ in self._conn.notifies(timeout=0):
                    pass
            return woken
        except psycopg.Error as error:
            log.warning("relay: listening for appends failed (%s); polling meanwhile", error)
            self.close()
            self.stopping.wait(min(timeout, 0.5))
            return False

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class DeliveryError(RuntimeError):
    """The broker did not acknowledge every message of a batch."""

    def __init__(self, errors: list[KafkaError]):
        super().__init__(", ".join(e.str() for e in errors[:3]))
        self.errors = errors


class Relay:
    """Moves events from the store to Kafka, at least once, in store order."""

    def __init__(
        self,
        store: TadpoleStore,
        position: RelayPosition,
        bootstrap_servers: str,
        catalogue: TopicCatalogue,
        idle_wait: float = 0.005,
        lag: LagRecorder | None = None,
        confirm_interval: float = 0.05,
        dead_letters: DeadLetters | None = None,
        wakeups: StoreWakeups | None = None,
    ):
        """``wakeups``: how the relay waits for new events once it has caught up; without
        it, it polls the store every ``idle_wait`` seconds."""
        self.store = store
        self.position = position
        self.bootstrap = bootstrap_servers
        self.catalogue = catalogue
        self.codec = Codec()
        self.idle_wait = idle_wait
        self.confirm_interval = confirm_interval
        self.stopping = threading.Event()
        self.wakeups = wakeups
        if wakeups is not None:
            wakeups.stopping = self.stopping
        #: Set when the broker went away (it may come back empty) or a batch failed:
        #: the producer is not to be trusted and is replaced before the next batch.
        self.producer_stale = threading.Event()
        self._producer: Producer | None = None  # made when first needed, not here
        self.relayed = 0
        self.lag = lag
        self.dead_letters = dead_letters or DeadLetters(store)
        self.dead_lettered = 0
        self._retry_at = 0.0

    @property
    def producer(self) -> Producer:
        """The producer, made (and the topics ensured) on first use."""
        if self._producer is None:
            self._producer = self._new_producer()
        return self._producer

    @producer.setter
    def producer(self, producer: Producer) -> None:
        self._producer = producer

    def _new_producer(self) -> Producer:
        ensure_topics(self.bootstrap, self.catalogue)
        stale = threading.Event()  # this producer's own: a dropped one cannot set it

        def on_error(error: KafkaError) -> None:
            """Client-level errors (served by poll/flush): is the broker gone?"""
            if error.fatal() or error.code() in (
                KafkaError._ALL_BROKERS_DOWN,
                KafkaError._TRANSPORT,
            ):
                stale.set()

        config: dict[str, Any] = {**producer_config(self.bootstrap), "error_cb": on_error}
        producer = Producer(config)
        self.producer_stale = stale
        return producer

    def run(self, on_batch: Callable[[int], None] | None = None) -> None:
        """Relay until :meth:`stop`; retries broker and store trouble with a growing pause.

        It produces continuously and confirms in rounds: every ``confirm_interval``
        (or when it has caught up) it waits for the broker to acknowledge what it
        produced and only then records the position. A failed round is re-sent
        from the last recorded position.
        """
        self.producer  # noqa: B018  # made now, at the start, as the loop's trouble handling expects
        backoff = Backoff()
        produced: int | None = None
        unconfirmed: list[EventMessage] = []
        errors: list[tuple[KafkaError, EventMessage]] = []
        since = time.monotonic()
        while not self.stopping.is_set():
            sent: list[EventMessage] = []
            try:
                if produced is None:
                    if self.wakeups is not None:
                        self.wakeups.listen()  # before reading: no append goes unnoticed
                    produced = self.position.get()
                    log.info("relay starts after store position %d", produced)
                sent = self._send(produced, errors)
                if sent:
                    if not unconfirmed:
                        since = time.monotonic()
                    unconfirmed.extend(sent)
                    produced = sent[-1].position
                if unconfirmed and (not sent or time.monotonic() - since >= self.confirm_interval):
                    self._confirm(errors)
                    self._record(unconfirmed)
                    unconfirmed, errors = [], []
                    if on_batch:
                        on_batch(produced)
                if not sent and not unconfirmed:
                    self._retry_due()
            except (DeliveryError, KafkaException) as error:
                pause = backoff.next()
                log.warning("relay: broker trouble (%s); retrying in %.1fs", error, pause)
                self.stopping.wait(pause)
                self._recover(error)
                produced, unconfirmed, errors = None, [], []
                continue
            except STORE_DOWN as error:
                pause = backoff.next()
                log.warning("relay: event store unavailable (%s); retrying in %.1fs", error, pause)
                self.stopping.wait(pause)
                self._recover(error)  # what was produced is sent again from the position
                produced, unconfirmed, errors = None, [], []
                continue
            backoff.reset()
            if not sent:
                if self.lag is not None and not unconfirmed:
                    self.lag.flush(older_than=IDLE_FLUSH)  # idle: what it measured, soon
                self._idle()

    def _idle(self) -> None:
        """Caught up: wait for the next append (or poll, without wakeups)."""
        if self.wakeups is None:
            self.stopping.wait(self.idle_wait)
        elif not self.stopping.is_set() and self.wakeups.wait(IDLE_WAKE):
            self.stopping.wait(GATHER)

    def relay_once(self, after: int) -> int:
        """Relay one batch after ``after`` and confirm it; the new position (0: nothing new)."""
        errors: list[tuple[KafkaError, EventMessage]] = []
        sent = self._send(after, errors)
        if not sent:
            return 0
        self._confirm(errors)
        self._record(sent)
        return sent[-1].position

    def _send(
        self, after: int, errors: list[tuple[KafkaError, EventMessage]]
    ) -> list[EventMessage]:
        """Produce the events after ``after`` (not waiting for acknowledgements).

        Returns every event it read, the dead-lettered ones included: the position
        moves past them.
        """
        notifications = self.store.notifications(after, BATCH)
        if not notifications:
            return []
        self.producer.poll(0)  # serves error_cb: did the broker go away while we idled?
        if self.producer_stale.is_set():
            raise DeliveryError([KafkaError(KafkaError._ALL_BROKERS_DOWN)])
        messages: list[EventMessage] = []
        for n in notifications:
            message = self._message(n)
            if message is None:  # dead-lettered: not produced, but the position passes it
                messages.append(_unreadable(n))
            else:
                messages.append(message)
                self._produce(message, errors)
        return messages

    def _message(self, n: Notification) -> EventMessage | None:
        """The message of a stored event; a dead letter if the store's mapper cannot read it."""
        try:
            return message_from_event(self.store.mapper.to_domain_event(n), n.id)
        except Exception as error:  # any failure to read one event is that event's
            self._dead_letter(
                _unreadable(n), f"unreadable stored event: {type(error).__name__}: {error}"
            )
            return None

    def _confirm(self, errors: list[tuple[KafkaError, EventMessage]]) -> None:
        """Wait until the broker acknowledged everything produced, or raise.

        A message the broker refused for good is dead-lettered instead.
        """
        deadline = time.monotonic() + 30
        remaining = self.producer.flush(0.1)
        while remaining and not self.producer_stale.is_set() and time.monotonic() < deadline:
            remaining = self.producer.flush(0.1)
        trouble = [e for e, _ in errors if e.code() not in REFUSED]
        if remaining or trouble or self.producer_stale.is_set():
            raise DeliveryError(trouble or [KafkaError(KafkaError._MSG_TIMED_OUT)])
        for error, message in errors:
            self._dead_letter(message, f"the broker refused it: {error.str()}")

    def _record(self, messages: list[EventMessage]) -> None:
        if self.lag is not None:
            self.lag.record([m for m in messages if m.type != UNREADABLE])
        self.position.set(messages[-1].position)
        self.relayed += len(messages)

    def _produce(
        self, message: EventMessage, errors: list[tuple[KafkaError, EventMessage]]
    ) -> None:
        """Produce one message; one that cannot be encoded or is refused at once is dead-lettered."""

        def delivered(error: KafkaError | None, _msg: object) -> None:
            if error is not None:
                errors.append((error, message))

        try:
            value = self.codec.encode(message)
        except Exception as error:  # fastavro raises many kinds on values out of range
            self._dead_letter(message, f"cannot be Avro-encoded: {type(error).__name__}: {error}")
            return
        while True:
            try:
                self.producer.produce(
                    self.catalogue.topic_for(message.type),
                    key=str(message.aggregate_id).encode(),
                    value=value,
                    headers={"position": str(message.position), "type": message.type},
                    on_delivery=delivered,
                )
                return
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as error:
                if error.args[0].code() not in REFUSED:
                    raise
                self._dead_letter(message, f"the producer refused it: {error.args[0].str()}")
                return

    def _dead_letter(self, message: EventMessage, reason: str) -> None:
        self.dead_letters.record(
            RELAY, message.aggregate_id, message.version, message.position, message.type, reason
        )
        self.dead_lettered += 1

    def _retry_due(self) -> None:
        """Produce again the dead letters someone asked to re-send (``tadpole dead-letters retry``)."""
        if time.monotonic() < self._retry_at:
            return
        self._retry_at = time.monotonic() + RETRY_EVERY
        for letter in self.dead_letters.due(RELAY):
            found = [n for n in self.store.notifications(letter.position - 1, 1)
                     if n.id == letter.position]  # fmt: skip
            if not found:
                self.dead_letters.record(
                    RELAY, letter.aggregate_id, letter.version, letter.position,
                    letter.event_type, "the stored event is not in the store's log",
                )  # fmt: skip
                continue
            message = self._message(found[0])
            if message is None:  # recorded again, with the reason
                continue
            errors: list[tuple[KafkaError, EventMessage]] = []
            before = self.dead_lettered
            self._produce(message, errors)
            self._confirm(errors)
            if self.dead_lettered == before:
                self.dead_letters.resolve([letter.id])
                log.info("relay: re-sent dead letter %d (%s)", letter.id, letter.event_type)

    def _recover(self, error: Exception) -> None:
        """Recreate the topics (an empty broker) and replace the producer.

        After broker trouble the producer is not trusted, fatal or not (see the
        module docstring): what it holds is purged (the batch is sent again) and a
        new one is made once the broker answers; until then every batch fails fast.
        """
        self.producer_stale.set()
        try:
            self.producer.purge()
            self.producer.flush(0)
            self.producer = self._new_producer()
        except (KafkaException, RuntimeError) as again:
            log.warning("relay: broker still unavailable: %s", again)

    def stop(self) -> None:
        self.stopping.set()  # a wait for an append notices within IDLE_WAKE

    def close(self) -> None:
        if self.wakeups is not None:
            self.wakeups.close()
        if self._producer is not None:
            self._producer.flush(5)
        self.position.close()
        if self.lag is not None:
            self.lag.flush()


def _unreadable(n: Notification) -> EventMessage:
    """What the relay knows of a stored event it cannot read: where it is."""
    return EventMessage(
        UNREADABLE, UUID(str(n.originator_id)), n.originator_version, n.id, EPOCH, {}
    )
