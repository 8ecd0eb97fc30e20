"""The relay against the real event store (PostgreSQL) and the embedded broker.

Every test has its own store schema and topic prefix (dropped afterwards); the
test that restarts a broker uses a broker of its own, so the session's shared
one is never restarted.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from psycopg import sql

from domain.family import Result
from domain.jobs import CompleteTask, CreateJob, FailTask, JobCreated
from domain.jobs.sweeps import Range, Sweep
from domain.processor import CommandProcessor
from domain.spots import (
    Claimed,
    ClaimedTask,
    ClaimTasks,
    Heartbeat,
    Hello,
    ReapSpots,
    SpotRegistered,
)
from eventstore.store import StorePort, TadpoleStore
from schemas.codec import Codec, EventMessage
from service.settings import Settings
from service.wiring import open_store
from streaming.broker import EmbeddedBroker
from streaming.consumer import StoreReader
from streaming.relay import Relay, RelayPosition
from streaming.topics import TopicCatalogue, ensure_topics
from tests.integration.support import running, wait_for

pytestmark = pytest.mark.integration

DATABASE_URL = Settings().database_url


# ---- helpers and fixtures -----------------------------------------------------------------


def sweep(tasks: int) -> Sweep:
    return Sweep(
        "/test/opt.jar", "com.test.Main", ("PSO",), Range(100, 100, 100), Range(10, 10, 10),
        Range(1, tasks, 1),
    )  # fmt: skip


class Writer:
    """The single writer, on the real store, with a clock that moves when told."""

    def __init__(self, store: TadpoleStore):
        self.processor = CommandProcessor(StorePort(store), 3, 5.0)
        self.now = datetime.now(UTC)
        self.load = 0.0

    def run(self, commands: list[Any], advance: float = 1.0) -> list[Result]:
        self.now += timedelta(seconds=advance)
        return self.processor.process(commands, self.now)

    def spots(self, n: int) -> list[str]:
        results = self.run([Hello(f"10.0.0.{i + 1}") for i in range(n)])
        return [r.spot_id for r in results if isinstance(r, SpotRegistered)]

    def heartbeats(self, spots: list[str]) -> None:
        """One stored ``HeartbeatRecorded`` per spot (the figures change every time)."""
        self.load += 0.01
        self.run([Heartbeat(s, cpu_load=self.load, running_tasks=1, total_cores=8) for s in spots])

    def job(self, tasks: int) -> str:
        (result,) = self.run([CreateJob(sweep(tasks))])
        assert isinstance(result, JobCreated)
        return result.job_id

    def claim(self, spot: str, n: int) -> list[ClaimedTask]:
        (result,) = self.run([ClaimTasks(spot, n)])
        assert isinstance(result, Claimed)
        return result.tasks

    def scenario(self) -> None:
        """Every kind of event: spots up, down and up again; jobs done, failed, reaped."""
        a, b, c = self.spots(3)
        self.heartbeats([a, b, c])
        self.job(3)
        small = self.claim(a, 3)
        self.run([CompleteTask(t.task_id, a, t.fence, 5, 50, 0.25, '{"ok":1}') for t in small])
        self.job(700)  # two blocks
        mine, theirs, lost = self.claim(a, 20), self.claim(b, 20), self.claim(c, 10)
        self.run(
            [CompleteTask(t.task_id, a, t.fence, 10, 100, 1.5, "{}") for t in mine[:14]]
            + [FailTask(t.task_id, a, t.fence, "boom", True) for t in mine[14:17]]
            + [FailTask(t.task_id, a, t.fence, "fatal", False) for t in mine[17:]]
            + [CompleteTask(t.task_id, b, None, 7, 70, -2.0, None) for t in theirs]
        )
        assert len(lost) == 10
        self.run([Heartbeat(a), Heartbeat(b)], advance=20)
        self.run([ReapSpots(10.0)])  # c is silent: DOWN, its tasks reaped
        self.heartbeats([c])  # and back UP


@dataclass
class Env:
    name: str
    settings: Settings
    store: TadpoleStore
    writer: Writer

    def messages(self) -> list[EventMessage]:
        """Every stored event, as the relay sends it, in store order."""
        reader = StoreReader(self.store)
        position, out = 0, list[EventMessage]()
        while True:
            last, page = reader.after(position)
            if last == position:
                return out
            out.extend(page)
            position = last

    def position(self) -> RelayPosition:
        return RelayPosition(self.settings.database_url, self.settings.store_schema)


def drop_schemas(prefix: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        names = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
            (prefix + "%",),
        ).fetchall()
        for (schema,) in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def env() -> Iterator[Env]:
    name = f"it_relay_{uuid4().hex[:10]}"
    settings = Settings().with_changes(store_schema=f"{name}_store", read_schema=f"{name}_read")
    store = open_store(settings)
    try:
        yield Env(name, settings, store, Writer(store))
    finally:
        store.close()
        drop_schemas(name)


def read_topics(bootstrap: str, topics: list[str]) -> list[Message]:
    """Everything in ``topics``, read without a consumer group up to each partition's end.

    The end is the partition EOF that librdkafka derives from its fetches: Tansu's
    ListOffsets answer (``get_watermark_offsets``) undercounts after a batch of
    several records (see ``test_broker.py``).
    """
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "allow.auto.create.topics": False,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        metadata = reader.list_topics(timeout=10)
        open_ = {(t, p) for t in topics for p in metadata.topics[t].partitions}
        reader.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in open_])
        out: list[Message] = []
        deadline = time.monotonic() + 30
        while open_:
            assert time.monotonic() < deadline, f"no end of {sorted(open_)} within 30s"
            message = reader.poll(0.1)
            if message is None:
                continue
            error = message.error()
            if error is None:
                out.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                open_.discard((message.topic() or "", message.partition() or 0))
            else:
                raise KafkaException(error)
        return out
    finally:
        reader.close()


def positions(messages: list[Message]) -> list[int]:
    codec = Codec()
    return [codec.decode(m.value() or b"").position for m in messages]


# ---- tests ---------------------------------------------------------------------------------------


def test_relays_every_event_in_store_order_to_its_topic_and_then_records_the_position(
    env: Env, broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    bootstrap = broker.bootstrap_servers
    env.writer.scenario()
    stored = env.messages()
    kinds = {m.type for m in stored}
    assert len(kinds) == 10, kinds  # every kind of event is in the scenario
    high_at_set: list[tuple[int, int]] = []

    class CheckedPosition(RelayPosition):
        """Notes, whenever the relay records a position, how much Kafka holds already."""

        def set(self, position: int) -> None:
            high_at_set.append((position, in_kafka()))
            super().set(position)

    def in_kafka() -> int:
        return len(read_topics(bootstrap, list(topics.event_topics)))

    position = CheckedPosition(env.settings.database_url, env.settings.store_schema)
    relay = Relay(env.store, position, bootstrap, topics)
    try:
        assert position.get() == 0
        with running(relay):
            wait_for(lambda: position.get() == stored[-1].position, 30, "the relay to catch up")
            first = len(stored)
            env.writer.heartbeats(env.writer.spots(2))  # more, while it runs
            stored = env.messages()
            wait_for(lambda: position.get() == stored[-1].position, 30, "the relay's second lap")
    finally:
        relay.close()
    assert len(stored) > first
    assert relay.relayed == len(stored)

    # the position was recorded only once its batch was in Kafka
    assert high_at_set and high_at_set[-1][0] == stored[-1].position
    for recorded, held in high_at_set:
        assert held >= sum(1 for m in stored if m.position <= recorded), high_at_set
    with contextlib.closing(env.position()) as again:
        assert again.get() == stored[-1].position  # in PostgreSQL, for the next relay

    # nothing else: exactly the stored events, each once, on the right topic
    codec = Codec()
    consumed = read_topics(bootstrap, list(topics.event_topics))
    assert len(consumed) == len(stored)
    by_position = {m.position: m for m in stored}
    partitions: dict[tuple[str, int], list[int]] = {}
    for message in consumed:
        decoded = codec.decode(message.value() or b"")
        original = by_position.pop(decoded.position)
        expected_topic = (
            topics.agent_lifecycle if original.type.startswith("Spot.") else topics.workload
        )
        assert expected_topic == topics.topic_for(original.type)
        assert message.topic() == expected_topic, original.type
        assert message.key() == str(original.aggregate_id).encode()
        headers = dict(message.headers() or [])
        assert headers == {
            "position": str(original.position).encode(),
            "type": original.type.encode(),
        }
        assert (
            decoded.type,
            decoded.aggregate_id,
            decoded.version,
            decoded.timestamp,
            decoded.data,
        ) == (
            original.type,
            original.aggregate_id,
            original.version,
            original.timestamp,
            original.data,
        )
        partitions.setdefault((message.topic() or "", message.partition() or 0), []).append(
            decoded.position
        )
    assert by_position == {}
    # store order on every partition (and so per aggregate: a key keeps its partition)
    for where, seen in partitions.items():
        assert seen == sorted(seen), where
    assert {t for t, _ in partitions} == {topics.workload, topics.agent_lifecycle}
    assert len(partitions) > 2  # the aggregates spread over several partitions


def test_relay_stopped_and_restarted_mid_stream_loses_nothing(
    env: Env, broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    bootstrap = broker.bootstrap_servers
    writer = env.writer
    spots = writer.spots(60)
    for _ in range(20):  # 1260 events: more than one relay batch (1000)
        writer.heartbeats(spots)

    # The first relay stops after its first confirmed round. More is written before
    # it stops (inside that round's callback, so not racing it): whatever that round
    # covered, events are left after the position it recorded.
    first = Relay(env.store, env.position(), bootstrap, topics)
    batches: list[int] = []

    def one_batch(position: int) -> None:
        batches.append(position)
        for _ in range(10):
            writer.heartbeats(spots)
        first.stop()

    errors: list[BaseException] = []

    def run_first() -> None:
        try:
            first.run(on_batch=one_batch)
        except BaseException as error:  # reported below
            errors.append(error)

    thread = threading.Thread(target=run_first, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive() and errors == []
    first.close()
    stopped_at = env.position().get()
    assert batches == [stopped_at]
    assert 0 < stopped_at < env.store.max_position()

    for _ in range(5):  # written while no relay runs
        writer.heartbeats(spots)

    # a new relay, same position table, carries on from there
    second = Relay(env.store, env.position(), bootstrap, topics)
    try:
        with running(second):
            for _ in range(5):  # and while it runs
                writer.heartbeats(spots)
            last = env.store.max_position()
            wait_for(lambda: second.position.get() == last, 30, "the second relay to catch up")
    finally:
        second.close()
    assert second.relayed == sum(1 for m in env.messages() if m.position > stopped_at)

    stored = {m.position for m in env.messages()}
    assert len(stored) == 60 + 40 * 60
    relayed = positions(read_topics(bootstrap, list(topics.event_topics)))
    assert set(relayed) == stored  # every event at least once
    assert len(relayed) >= len(stored)


def test_relay_recreates_the_topics_of_a_broker_that_came_back_empty(env: Env) -> None:
    catalogue = TopicCatalogue(f"r{uuid4().hex[:10]}")
    writer = env.writer
    spots = writer.spots(5)
    with EmbeddedBroker() as own:
        bootstrap = own.bootstrap_servers
        relay = Relay(env.store, env.position(), bootstrap, catalogue)
        try:
            with running(relay):
                before = env.store.max_position()
                wait_for(lambda: relay.position.get() == before, 30, "the first events")
                assert set(positions(read_topics(bootstrap, list(catalogue.event_topics)))) == {
                    m.position for m in env.messages()
                }

                own.restart()  # empty: no topics, no producer ids

                job = writer.job(10)
                writer.heartbeats(spots)
                after = {m.position for m in env.messages()} - set(range(before + 1))
                assert len(after) == 1 + 1 + len(spots)

                def arrived() -> bool:
                    admin = AdminClient({"bootstrap.servers": bootstrap})
                    names = set(admin.list_topics(timeout=10).topics)
                    if not set(catalogue.event_topics) <= names:
                        return False
                    try:
                        got = read_topics(bootstrap, list(catalogue.event_topics))
                    except KafkaException:
                        return False
                    return after <= set(positions(got))

                wait_for(arrived, 60, "the events appended after the restart")
                wait_for(lambda: relay.position.get() == max(after), 10, "the position to follow")
        finally:
            relay.close()
        assert set(catalogue.all_topics) <= set(
            AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics
        )
        # what the empty broker lost is not re-sent: only what came after is there
        relayed = positions(read_topics(bootstrap, list(catalogue.event_topics)))
        assert set(relayed) == after, job
        ensure_topics(bootstrap, catalogue)  # still fine
