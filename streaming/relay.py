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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from psycopg import sql

from domain.store import TadpoleStore
from schemas.codec import Codec, EventMessage, message_from_event
from streaming.consumer import IDLE_FLUSH, LagRecorder
from streaming.topics import TopicCatalogue, ensure_topics, producer_config

log = logging.getLogger(__name__)

BATCH = 1000


def topic_for(catalogue: TopicCatalogue, message_type: str) -> str:
    return catalogue.agent_lifecycle if message_type.startswith("Spot.") else catalogue.workload


class RelayPosition:
    """The relay's position in the notification log, in PostgreSQL."""

    def __init__(self, conninfo: str, schema: str, name: str = "relay"):
        # A position lost in a crash only means re-sending a batch (consumers
        # ignore duplicates), so its commits need not wait for the WAL flush.
        self.conn = psycopg.connect(conninfo, autocommit=True, options="-c synchronous_commit=off")
        self.table = sql.Identifier(schema, "relay_position")
        self.name = name
        self.conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        self.conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, position bigint NOT NULL)"
            ).format(self.table)
        )

    def get(self) -> int:
        row = self.conn.execute(
            sql.SQL("SELECT position FROM {} WHERE name = %s").format(self.table), (self.name,)
        ).fetchone()
        return int(row[0]) if row else 0

    def set(self, position: int) -> None:
        self.conn.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (%s, %s) ON CONFLICT (name) "
                "DO UPDATE SET position = EXCLUDED.position"
            ).format(self.table),
            (self.name, position),
        )

    def close(self) -> None:
        self.conn.close()


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
    ):
        self.store = store
        self.position = position
        self.bootstrap = bootstrap_servers
        self.catalogue = catalogue
        self.codec = Codec()
        self.idle_wait = idle_wait
        self.confirm_interval = confirm_interval
        self.stopping = threading.Event()
        #: Set when the broker went away (it may come back empty) or a batch failed:
        #: the producer is not to be trusted and is replaced before the next batch.
        self.producer_stale = threading.Event()
        self.producer = self._new_producer()
        self.relayed = 0
        self.lag = lag

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
        """Relay until :meth:`stop`; retries broker trouble with a growing pause.

        It produces continuously and confirms in rounds: every ``confirm_interval``
        (or when it has caught up) it waits for the broker to acknowledge what it
        produced and only then records the position. A failed round is re-sent
        from the last recorded position.
        """
        pause = 0.1
        produced = self.position.get()
        log.info("relay starts after store position %d", produced)
        unconfirmed: list[EventMessage] = []
        errors: list[KafkaError] = []
        since = time.monotonic()
        while not self.stopping.is_set():
            try:
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
            except (DeliveryError, KafkaException) as error:
                log.warning("relay: broker trouble (%s); retrying in %.1fs", error, pause)
                self.stopping.wait(pause)
                pause = min(pause * 2, 5.0)
                self._recover(error)
                produced = self.position.get()
                unconfirmed, errors = [], []
                continue
            pause = 0.1
            if not sent:
                if self.lag is not None and not unconfirmed:
                    self.lag.flush(older_than=IDLE_FLUSH)  # idle: what it measured, soon
                self.stopping.wait(self.idle_wait)

    def relay_once(self, after: int) -> int:
        """Relay one batch after ``after`` and confirm it; the new position (0: nothing new)."""
        errors: list[KafkaError] = []
        sent = self._send(after, errors)
        if not sent:
            return 0
        self._confirm(errors)
        self._record(sent)
        return sent[-1].position

    def _send(self, after: int, errors: list[KafkaError]) -> list[EventMessage]:
        """Produce the events after ``after`` (not waiting for acknowledgements)."""
        notifications = self.store.notifications(after, BATCH)
        if not notifications:
            return []
        self.producer.poll(0)  # serves error_cb: did the broker go away while we idled?
        if self.producer_stale.is_set():
            raise DeliveryError([KafkaError(KafkaError._ALL_BROKERS_DOWN)])

        def delivered(error: KafkaError | None, _msg: object) -> None:
            if error is not None:
                errors.append(error)

        messages = [
            message_from_event(self.store.mapper.to_domain_event(n), n.id) for n in notifications
        ]
        for message in messages:
            self._produce(message, delivered)
        return messages

    def _confirm(self, errors: list[KafkaError]) -> None:
        """Wait until the broker acknowledged everything produced, or raise."""
        deadline = time.monotonic() + 30
        remaining = self.producer.flush(0.1)
        while remaining and not self.producer_stale.is_set() and time.monotonic() < deadline:
            remaining = self.producer.flush(0.1)
        if remaining or errors or self.producer_stale.is_set():
            raise DeliveryError(errors or [KafkaError(KafkaError._MSG_TIMED_OUT)])

    def _record(self, messages: list[EventMessage]) -> None:
        if self.lag is not None:
            self.lag.record(messages)
        self.position.set(messages[-1].position)
        self.relayed += len(messages)

    def _produce(self, message: EventMessage, delivered: Callable[..., None]) -> None:
        value = self.codec.encode(message)
        while True:
            try:
                self.producer.produce(
                    topic_for(self.catalogue, message.type),
                    key=str(message.aggregate_id).encode(),
                    value=value,
                    headers={"position": str(message.position), "type": message.type},
                    on_delivery=delivered,
                )
                return
            except BufferError:
                self.producer.poll(0.05)

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
        self.stopping.set()

    def close(self) -> None:
        self.producer.flush(5)
        self.position.close()
        if self.lag is not None:
            self.lag.flush()


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
