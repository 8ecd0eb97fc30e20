"""The projector: Kafka is the fast path into a read model, the event store the truth.

A :class:`Projector` feeds one read model from its own consumer group. Every
batch is applied idempotently (the read model records the version it applied per
aggregate with the effect) and only then are the offsets committed. It catches
up from the event store itself:

* on start, before it trusts Kafka;
* when an event arrives whose aggregate skipped a version (a gap): that
  aggregate's missing events are read from the store;
* every ``reconcile_interval`` seconds, reading the store's log after its last
  catch-up, which is how it heals after a broker that came back empty;
* continuously while the consumer group has not assigned it partitions yet;
* when the read model lost its data (a Redis restart): rebuilt from the start.

Bytes that do not decode go to the topic's dead-letter topic with the reason;
the aggregate named by the message key is then re-read from the store, and the
consumer carries on.

An event the read model cannot apply (a value its columns refuse, say) is
dead-lettered with the reason (:mod:`streaming.deadletters`): its aggregate is
parked, the others go on, and ``tadpole dead-letters retry`` has it re-applied
from the store once the cause is fixed. With the store or the read model
unreachable the projector waits and retries with growing pauses instead of
exiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol
from uuid import UUID

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import Notification
from eventsourcing.persistence import OperationalError as StoreOperationalError
from psycopg import sql

from eventstore.store import TadpoleStore
from schemas.codec import Codec, DecodeError, EventMessage, message_from_event
from streaming.backoff import Backoff
from streaming.deadletters import DeadLetters, projector_stage
from streaming.progress import Progress
from streaming.topics import TopicCatalogue, consumer_config, ensure_topics, producer_config

log = logging.getLogger(__name__)

STORE_PAGE = 2000
#: Offsets are committed at most this often (s). Every effect records its own
#: version, so what a crash leaves uncommitted is only delivered again, harmlessly;
#: a commit per applied batch cost the broker a tenth of a core under load.
COMMIT_EVERY = 0.2
#: An idle projector or relay shows the lag samples it holds after this long (s).
IDLE_FLUSH = 0.25
#: Seconds without trouble after which a projector's retry pauses start small again.
BACKOFF_RESET = 30.0
#: A projector shows how far it got (for health) at most this often (s).
PROGRESS_EVERY = 0.5


class ReadModel(Protocol):
    name: str
    #: Errors that mean "unreachable, try again later", not "this event is bad".
    transient: tuple[type[BaseException], ...]

    def create(self) -> None: ...

    def reset(self) -> None: ...

    def checkpoint(self) -> int: ...

    def set_checkpoint(self, position: int) -> None: ...

    def lost(self) -> bool: ...

    def apply(self, messages: Sequence[EventMessage]) -> list[EventMessage]:
        """Apply what is next per aggregate; return the messages that came after a gap."""
        ...

    def close(self) -> None: ...


class LagRecorder(Protocol):
    def record(self, messages: Sequence[EventMessage]) -> None:
        """Note how long ago each just-applied event was created."""
        ...

    def flush(self, older_than: float = 0.0) -> None:
        """Make what was recorded visible (a recorder may buffer), if its last
        flush is ``older_than`` seconds ago."""
        ...


class StoreReader:
    """Reads events from the store in the form the read models apply."""

    def __init__(self, store: TadpoleStore):
        self.store = store
        #: Told of a stored event the mapper cannot read (it is then skipped);
        #: without it, reading one raises.
        self.unreadable: Callable[[Notification, Exception], None] | None = None

    def after(
        self,
        position: int,
        limit: int = STORE_PAGE,
        skip: set[int] | None = None,
        until: int | None = None,
    ) -> tuple[int, list[EventMessage]]:
        """Events after ``position`` (up to ``until``, but those in ``skip``); the last read."""
        notifications = self.store.notifications(position, limit)
        if until is not None:
            notifications = [n for n in notifications if n.id <= until]
        skip = skip or set()
        messages: list[EventMessage] = []
        for n in notifications:
            if n.id in skip:
                continue
            try:
                messages.append(message_from_event(self.store.mapper.to_domain_event(n), n.id))
            except Exception as error:  # that one event's: the others are read
                if self.unreadable is None:
                    raise
                self.unreadable(n, error)
        return (notifications[-1].id if notifications else position), messages

    def ids_after(self, position: int, limit: int = STORE_PAGE) -> list[int]:
        """Notification ids after ``position``: an index-only read, no event data."""
        recorder: Any = self.store.recorder
        datastore = getattr(recorder, "datastore", None)
        if datastore is None:  # not PostgreSQL: read the notifications themselves
            return [n.id for n in self.store.notifications(position, limit)]
        statement = sql.SQL(
            "SELECT notification_id FROM {}.{} WHERE notification_id > %s "
            "ORDER BY notification_id LIMIT %s"
        ).format(sql.Identifier(datastore.schema), sql.Identifier(recorder.events_table_name))
        with datastore.get_connection() as conn, conn.cursor() as cur:
            cur.execute(statement, (position, limit))
            return [row["notification_id"] for row in cur.fetchall()]

    def last_position(self) -> int:
        """The store's last notification id."""
        return self.store.max_position()

    def first_event(self, uuid: UUID) -> EventMessage | None:
        """An aggregate's first event (a job's ``Job.Created``, with its sweep), if stored."""
        first = next(iter(self.store.events.get(uuid, lte=1)), None)
        return None if first is None else message_from_event(first, 0)

    def aggregate(self, uuid: UUID, after_version: int) -> list[EventMessage]:
        """An aggregate's events after a version (their store positions are unknown: 0)."""
        events = self.store.events.get(uuid, gt=after_version)
        return [message_from_event(e, 0) for e in events]


class Projector:
    """Feeds one read model from Kafka, healing from the store (see the module docstring)."""

    def __init__(
        self,
        model: ReadModel,
        store: TadpoleStore,
        bootstrap_servers: str,
        catalogue: TopicCatalogue,
        reconcile_interval: float = 2.0,
        lag: LagRecorder | None = None,
        dead_letters: DeadLetters | None = None,
        progress: Progress | None = None,
    ):
        self.model = model
        self.reader = StoreReader(store)
        self.bootstrap = bootstrap_servers
        self.catalogue = catalogue
        self.codec = Codec()
        self.reconcile_interval = reconcile_interval
        self.stopping = threading.Event()
        self.group = f"{catalogue.prefix}.projector.{model.name}"
        self.topics = list(catalogue.event_topics)
        self.consumer: Consumer | None = None
        self._dlq: Producer | None = None
        self.applied_from_kafka = 0
        self.dead_lettered = 0
        self.lag = lag
        #: Store positions applied from Kafka since the last catch-up: not read again.
        self.seen: set[int] = set()
        self._uncommitted = False
        self._committed_at = 0.0
        self.stage = projector_stage(model.name)
        self.dead_letters = dead_letters or DeadLetters(store)
        self.reader.unreadable = self._unreadable
        self.progress = progress or Progress(store)
        #: Aggregates with a dead letter: none of their events is applied until re-applied.
        self.parked: dict[UUID, int] | None = None
        #: The highest store position applied, and what was last shown of it.
        self.position = 0
        self._shown = (0, 0.0)

    # ---- the store: the truth ------------------------------------------------------

    def catch_up(self, until: int | None = None) -> int:
        """Apply everything in the store after the read model's checkpoint (up to ``until``).

        The periodic reconciliation passes the store's last position as of the
        previous one: an event stored since is most likely still on its way
        through Kafka, and reading it from the store too would only apply it
        twice (the second time a no-op) and hold up the consumer.
        """
        rebuilding = self.model.lost()
        if rebuilding:
            log.warning("%s read model lost its data: rebuilding from the store", self.model.name)
            self.model.reset()
            self.seen.clear()
        start = position = self.model.checkpoint()
        while True:
            ids = self.reader.ids_after(position)
            if until is not None:
                ids = [i for i in ids if i <= until]
            if not ids:
                break
            missing = next((i for i in ids if i not in self.seen), None)
            if missing is None:
                position = ids[-1]  # Kafka brought all of these: nothing to read
            else:
                position, page = self.reader.after(missing - 1, skip=self.seen, until=until)
                self._apply(page)
            self.seen = {p for p in self.seen if p > position}
        if position != start or rebuilding:
            self.model.set_checkpoint(position)
        self.position = max(self.position, position)
        return position

    def _apply(self, messages: Sequence[EventMessage]) -> None:
        for uuid in dict.fromkeys(m.aggregate_id for m in self._apply_safely(messages)):
            self._heal(uuid)
        if messages:
            self.position = max(self.position, max(m.position for m in messages))

    def _apply_safely(self, messages: Sequence[EventMessage]) -> list[EventMessage]:
        """Apply what is not parked; an event the model refuses is dead-lettered.

        Returns the messages that came after a gap. A transient error (the read
        model unreachable) is raised: nothing is dead-lettered for it.
        """
        parked = self._parked()
        if parked:
            messages = [m for m in messages if m.aggregate_id not in parked]
        try:
            return self.model.apply(messages)
        except self.model.transient:
            raise
        except Exception:  # one of them is bad: find it, apply the others one by one
            log.warning("%s: a batch of %d failed; applying one by one", self.stage, len(messages))
        gaps: list[EventMessage] = []
        refused: dict[UUID, tuple[EventMessage, Exception]] = {}
        for m in messages:
            if m.aggregate_id in parked or m.aggregate_id in refused:
                continue  # (after its refused event: never applied out of order)
            try:
                gaps.extend(self.model.apply([m]))
            except self.model.transient:
                raise
            except Exception as error:  # this event cannot be applied
                refused[m.aggregate_id] = (m, error)
        for m, refusal in refused.values():
            reason = f"{type(refusal).__name__}: {refusal}"
            self.dead_letters.record(
                self.stage, m.aggregate_id, m.version, m.position, m.type, reason
            )
            parked[m.aggregate_id] = m.version
        return gaps

    def _unreadable(self, n: Notification, error: Exception) -> None:
        """A stored event the store's mapper cannot read: a dead letter, its aggregate parked."""
        uuid = UUID(str(n.originator_id))
        reason = f"unreadable stored event: {type(error).__name__}: {error}"
        self.dead_letters.record(self.stage, uuid, n.originator_version, n.id, n.topic, reason)
        self._parked()[uuid] = n.originator_version

    def _parked(self) -> dict[UUID, int]:
        if self.parked is None:
            self.parked = {
                d.aggregate_id: d.version for d in self.dead_letters.unresolved(self.stage)
            }
        return self.parked

    def _heal(self, uuid: UUID) -> None:
        """Apply an aggregate's events from the store until it has no gap."""
        for _ in range(3):
            if uuid in self._parked():
                return
            try:
                missing = self.reader.aggregate(uuid, 0)
            except (StoreOperationalError, StoreInterfaceError):
                raise
            except Exception as error:  # one of its stored events cannot be read
                reason = f"unreadable stored events: {type(error).__name__}: {error}"
                self.dead_letters.record(self.stage, uuid, 0, 0, "unreadable", reason)
                self._parked()[uuid] = 0
                return
            if not self._apply_safely(missing):
                return
        log.error("%s: aggregate %s still has a gap after healing", self.model.name, uuid)

    def retry_dead_letters(self) -> None:
        """Re-apply, from the store, the aggregates whose letters someone asked to re-apply."""
        parked = self._parked()
        due: dict[UUID, list[int]] = {}
        for letter in self.dead_letters.due(self.stage):
            due.setdefault(letter.aggregate_id, []).append(letter.id)
        versions = {d.id: d.version for d in self.dead_letters.due(self.stage)}
        for uuid, ids in due.items():
            parked.pop(uuid, None)
            self._heal(uuid)
            failed_at = parked.get(uuid)
            if failed_at is None:
                self.dead_letters.resolve(ids)
                log.info("%s: re-applied %s (%d dead letters)", self.stage, uuid, len(ids))
            else:  # applied up to a later event that failed (recorded): the earlier ones stand
                self.dead_letters.resolve([i for i in ids if versions.get(i, 0) < failed_at])
        # Letters resolved (or added) elsewhere: the table is the truth.
        self.parked = {d.aggregate_id: d.version for d in self.dead_letters.unresolved(self.stage)}

    def show_progress(self) -> None:
        """Record how far this projector got, for health (throttled, best effort)."""
        position, at = self._shown
        if self.position != position and time.monotonic() - at >= PROGRESS_EVERY:
            self._shown = (self.position, time.monotonic())
            try:
                self.progress.publish(self.stage, self.position)
            except Exception as error:  # a figure for health: never a reason to stop
                log.warning("%s: progress not recorded: %s", self.stage, error)

    # ---- Kafka: the fast path ---------------------------------------------------------

    def _connect(self) -> Consumer:
        ensure_topics(self.bootstrap, self.catalogue)
        consumer = Consumer(consumer_config(self.bootstrap, self.group))
        consumer.subscribe(self.topics)
        return consumer

    def run(self) -> None:
        """Catch up from the store, then consume until :meth:`stop`.

        Whatever fails in a round (the broker, the store, the read model) is
        logged and the round tried again after a growing pause: a projector never
        exits because something it depends on is away for a while.
        """
        backoff = Backoff()
        started, failed_at = False, 0.0
        try:
            while not self.stopping.is_set():
                try:
                    if not started:
                        self.model.create()
                        self.catch_up()
                        started = True
                    self._consume()
                except Exception as error:  # anything it depends on may be away a while
                    if time.monotonic() - failed_at > BACKOFF_RESET:
                        backoff.reset()  # the last trouble is long over: start small again
                    failed_at = time.monotonic()
                    pause = backoff.next()
                    log.warning(
                        "%s: %s: %s; retrying in %.1fs",
                        self.stage,
                        type(error).__name__,
                        error,
                        pause,
                    )
                    self._drop_consumer()  # uncommitted offsets are delivered again
                    started = False  # create what may be gone, catch up from the store
                    # ...all of it after the checkpoint: a read model that crashed may have
                    # lost its last commits (synchronous_commit=off), and Kafka will not
                    # bring again what this projector already committed offsets for.
                    self.seen.clear()
                    self.stopping.wait(pause)
        finally:
            if self.lag is not None:
                self.lag.flush()

    def _consume(self) -> None:
        last_reconcile = time.monotonic()
        settled = self.reader.last_position()
        while not self.stopping.is_set():
            try:
                if self.consumer is None:
                    self.consumer = self._connect()
                self.poll_once()
            except KafkaException as error:  # the broker may vanish and come back empty
                log.warning("%s: consumer trouble (%s); reconnecting", self.model.name, error)
                self._drop_consumer()
                self.stopping.wait(0.5)
            # Until the group has given us partitions (about 3 s after a start or a
            # rebalance), the store is the only way to keep the lag small.
            unassigned = self.consumer is None or not self.consumer.assignment()
            if unassigned:
                self.catch_up()
                last_reconcile = time.monotonic()
            elif time.monotonic() - last_reconcile >= self.reconcile_interval:
                latest = self.reader.last_position()
                self.catch_up(until=settled)
                self.retry_dead_letters()
                settled, last_reconcile = latest, time.monotonic()
            self.show_progress()

    def poll_once(self, timeout: float = 0.02) -> int:
        """Apply what Kafka has: wait up to ``timeout`` for a message, then take the rest.

        ``consume(n, timeout)`` would wait out its whole timeout unless ``n``
        messages came, adding that much lag to every batch; ``poll`` returns as
        soon as one message is there, and the messages fetched with it (a writer's
        batch of events travels together) come with it at no wait.
        """
        assert self.consumer is not None
        first = self.consumer.poll(timeout)
        if first is None:  # idle: what it applied and measured shows soon
            if self.lag is not None:
                self.lag.flush(older_than=IDLE_FLUSH)
            self._commit_due()
            return 0
        raw = [first, *self.consumer.consume(num_messages=499, timeout=0)]
        messages: list[EventMessage] = []
        consumed = 0
        for msg in raw:
            error = msg.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("%s: consumer error %s", self.model.name, error)
                continue
            consumed += 1
            try:
                messages.append(self.codec.decode(msg.value() or b""))
            except DecodeError as bad:
                self._dead_letter(msg, str(bad))
        if messages:
            self._apply(messages)
            self.seen.update(m.position for m in messages)
            self.applied_from_kafka += len(messages)
            if self.lag is not None:
                self.lag.record(messages)
        if consumed:
            self._uncommitted = True
        self._commit_due()
        return len(messages)

    def _dead_letter(self, msg: Message, reason: str) -> None:
        topic = msg.topic() or self.catalogue.workload
        if self._dlq is None:
            # Not idempotent: an idempotent producer that outlives an emptied broker
            # never recovers, and dead letters may be duplicated harmlessly.
            self._dlq = Producer(producer_config(self.bootstrap, **{"enable.idempotence": False}))
        self._dlq.produce(
            self.catalogue.dead_letter(topic),
            key=msg.key(),
            value=msg.value(),
            headers={
                "reason": reason,
                "source.topic": topic,
                "source.partition": str(msg.partition()),
                "source.offset": str(msg.offset()),
                "consumer.group": self.group,
            },
        )
        if self._dlq.flush(5):
            self._dlq = None  # a broker that went away: the next dead letter gets a new one
            log.error(
                "%s: could not dead-letter %s[%s]@%s",
                self.model.name,
                topic,
                msg.partition(),
                msg.offset(),
            )
        else:
            self.dead_lettered += 1
        log.warning(
            "%s: dead-lettered %s[%s]@%s: %s",
            self.model.name,
            topic,
            msg.partition(),
            msg.offset(),
            reason,
        )
        try:
            uuid = UUID((msg.key() or b"").decode())
        except ValueError:
            return  # no usable key: the periodic catch-up re-reads it from the store
        self._heal(uuid)

    def _commit_due(self) -> None:
        if self._uncommitted and time.monotonic() - self._committed_at >= COMMIT_EVERY:
            self._commit()

    def _commit(self, asynchronous: bool = True) -> None:
        """Commit the offsets of what was applied (stored on delivery, after the effect)."""
        assert self.consumer is not None
        if asynchronous:
            self.consumer.commit(asynchronous=True)
        else:
            self.consumer.commit(asynchronous=False)
        self._uncommitted, self._committed_at = False, time.monotonic()

    def _drop_consumer(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # closing a consumer of a vanished broker may fail too
                log.debug("closing a broken consumer failed", exc_info=True)
            self.consumer = None

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        if self.consumer is not None and self._uncommitted:
            try:
                self._commit(asynchronous=False)
            except KafkaException as error:  # delivered again to the next owner: harmless
                log.warning("%s: last offsets not committed: %s", self.model.name, error)
        self._drop_consumer()
        if self._dlq is not None:
            self._dlq.flush(5)
        self.model.close()
