"""The projectors and the read models against the real store, Redis and the embedded broker.

Every test has its own store schema, read schemas, Redis prefix and topic prefix,
all removed afterwards. "Equal" always means equal ``dump()``s: a read model fed
through Kafka is compared with one rebuilt from the event store alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
import redis
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from psycopg import sql

from domain.family import Result
from domain.ids import parse_job_id, parse_spot_id
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
from domain.workflows import (
    CancelRun,
    CompleteWorkflowTask,
    Definition,
    FailWorkflowTask,
    RegisterWorkflow,
    RenewLease,
    RunStarted,
    StartRun,
)
from eventstore.store import StorePort, TadpoleStore
from projections.postgres.tables import PostgresReadModel
from projections.redis.dashboards import LagSamples, RedisReadModel
from schemas.codec import Codec, EventMessage
from service.settings import Settings
from service.wiring import open_store
from streaming.broker import EmbeddedBroker
from streaming.consumer import Projector, ReadModel, StoreReader
from streaming.relay import Relay, RelayPosition
from streaming.topics import TopicCatalogue, producer_config
from tests.integration.support import relay_all, running, wait_for

pytestmark = pytest.mark.integration

SETTINGS = Settings()
JOIN = 30.0  # a consumer group joins in about 3 s on the embedded broker


# ---- helpers ------------------------------------------------------------------------------


def sweep(tasks: int) -> Sweep:
    return Sweep(
        "/test/opt.jar", "com.test.Main", ("PSO", "GA"), Range(100, 100, 100), Range(10, 10, 10),
        Range(1, max(tasks // 2, 1), 1),
    )  # fmt: skip


class Writer:
    """The single writer, on the real store, with a clock that moves when told."""

    def __init__(self, store: TadpoleStore):
        self.processor = CommandProcessor(StorePort(store), 3, 5.0)
        self.now = datetime.now(UTC)
        self.load = 0.0

    def run(self, commands: list[Any], advance: float = 1.0) -> list[Result]:
        self.now = max(self.now + timedelta(seconds=advance), datetime.now(UTC))
        return self.processor.process(commands, self.now)

    def spots(self, n: int) -> list[str]:
        results = self.run([Hello(f"10.0.1.{i + 1}") for i in range(n)])
        return [r.spot_id for r in results if isinstance(r, SpotRegistered)]

    def heartbeats(self, spots: list[str]) -> None:
        """One stored ``HeartbeatRecorded`` per spot (the figures change every time)."""
        self.load += 0.01
        self.run([Heartbeat(s, cpu_load=self.load, running_tasks=2, total_cores=4) for s in spots])

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
        self.job(4)
        small = self.claim(a, 4)
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
        self.workflows(a)

    def workflows(self, spot: str) -> None:
        """Workflow runs: one completed after a failed attempt and a renewal, one cancelled."""
        self.run([RegisterWorkflow(WORKFLOW)])
        (done,) = self.run([StartRun("it", "chain", uuid4().hex, '{"n": 1}')])
        self.run([Heartbeat(spot)])
        (a,) = self.claim(spot, 1)
        self.run([FailWorkflowTask(a.task_id, spot, a.fence, "flaky", True)])
        self.run([Heartbeat(spot)], advance=2)  # past the backoff
        (a,) = self.claim(spot, 1)
        self.run([RenewLease(a.task_id, spot, a.fence)])
        self.run([CompleteWorkflowTask(a.task_id, spot, a.fence, '{"ok": true}')])
        (b,) = self.claim(spot, 1)
        self.run([CompleteWorkflowTask(b.task_id, spot, b.fence, "{}")])
        (cancelled,) = self.run([StartRun("it", "chain", uuid4().hex, "{}")])
        assert len(self.claim(spot, 1)) == 1
        self.run([CancelRun(cancelled.instance_id)])
        assert isinstance(done, RunStarted)


WORKFLOW = Definition.from_dict(
    {
        "namespace": "it",
        "name": "chain",
        "version": "1",
        "tasks": [{"id": "a"}, {"id": "b", "dependsOn": ["a"]}],
    }
)


class WatchedProjector(Projector):
    """A projector that notes when each catch-up from the store started."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.catch_ups: list[float] = []
        self.partitions: set[tuple[str, int]] = set()

    def catch_up(self, until: int | None = None) -> int:
        self.catch_ups.append(time.monotonic())
        return super().catch_up(until)

    def _connect(self) -> Consumer:
        # The same subscription, with callbacks that tell the test its partitions
        # (a consumer's own methods are not to be called from the test's thread).
        consumer = super()._connect()
        consumer.subscribe(self.topics, on_assign=self._assigned, on_revoke=self._revoked)
        return consumer

    def _assigned(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions.update((tp.topic, tp.partition) for tp in partitions)

    def _revoked(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.partitions.difference_update((tp.topic, tp.partition) for tp in partitions)

    def assigned(self) -> bool:
        """Every partition of every event topic (as the catalogue created them)."""
        wanted = sum(s.partitions for s in self.catalogue.specs() if s.name in self.topics)
        return len(self.partitions) == wanted

    def catch_ups_since(self, moment: float) -> int:
        return sum(1 for t in self.catch_ups if t >= moment)


@dataclass
class Env:
    """One test's store, names and topics."""

    name: str
    settings: Settings
    store: TadpoleStore
    bootstrap: str
    topics: TopicCatalogue
    writer: Writer = field(init=False)
    closing: list[Callable[[], None]] = field(default_factory=list)
    rebuilds: int = 0

    def __post_init__(self) -> None:
        self.writer = Writer(self.store)

    # ---- the store and Kafka --------------------------------------------------------------

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

    def relay(self) -> Relay:
        relay = Relay(
            self.store,
            RelayPosition(self.settings.database_url, self.settings.store_schema),
            self.bootstrap,
            self.topics,
        )
        self.closing.append(relay.close)
        return relay

    # ---- read models ----------------------------------------------------------------------

    def postgres(self, schema: str | None = None) -> PostgresReadModel:
        model = PostgresReadModel(
            self.settings.database_url,
            schema or self.settings.read_schema,
            StoreReader(self.store).first_event,
        )
        self.closing.append(model.close)
        return model

    def redis(self, prefix: str | None = None) -> RedisReadModel:
        model = RedisReadModel(self.settings.redis_url, prefix or self.settings.redis_prefix)
        self.closing.append(model.close)
        return model

    def projector(self, model: ReadModel, **kwargs: Any) -> WatchedProjector:
        kwargs.setdefault("reconcile_interval", 3600.0)  # Kafka alone, once assigned
        projector = WatchedProjector(model, self.store, self.bootstrap, self.topics, **kwargs)
        self.closing.append(projector.close)
        return projector

    def rebuilt(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Dumps of a fresh PostgreSQL and a fresh Redis model built from the store alone."""
        self.rebuilds += 1
        postgres = self.postgres(f"{self.name}_rebuilt{self.rebuilds}")
        cache = self.redis(f"{self.name}_rebuilt{self.rebuilds}")
        for model in (postgres, cache):
            model.create()
            Projector(model, self.store, self.bootstrap, self.topics).catch_up()
        return postgres.dump(), cache.dump()

    def dumps(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Dumps of the models under test, read through connections of their own."""
        postgres = PostgresReadModel(
            self.settings.database_url,
            self.settings.read_schema,
            StoreReader(self.store).first_event,
        )
        cache = RedisReadModel(self.settings.redis_url, self.settings.redis_prefix)
        try:
            return postgres.dump(), cache.dump()
        finally:
            postgres.close()
            cache.close()

    def applied(self, uuid: UUID) -> tuple[int, int]:
        """The version of ``uuid`` applied by the PostgreSQL and the Redis model."""
        with psycopg.connect(self.settings.database_url) as conn:
            row = conn.execute(
                sql.SQL("SELECT version FROM {}.applied WHERE aggregate_id = %s").format(
                    sql.Identifier(self.settings.read_schema)
                ),
                (uuid,),
            ).fetchone()
        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        with contextlib.closing(client):
            cached = client.hget(f"{self.settings.redis_prefix}:applied", str(uuid))
        return (int(row[0]) if row else 0, int(cached) if cached else 0)


def drop_everything(name: str) -> None:
    with psycopg.connect(SETTINGS.database_url, autocommit=True) as conn:
        names = conn.execute(
            "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
            (name + "%",),
        ).fetchall()
        for (schema,) in names:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    client = redis.Redis.from_url(SETTINGS.redis_url)
    with contextlib.closing(client):
        keys = list(client.scan_iter(match=f"{name}*", count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def env(broker: EmbeddedBroker, topics: TopicCatalogue) -> Iterator[Env]:
    with environment(broker, topics) as made:
        yield made


@contextlib.contextmanager
def environment(broker: EmbeddedBroker, topics: TopicCatalogue) -> Iterator[Env]:
    """A store, read-model names and a writer of their own; everything dropped afterwards."""
    name = f"it_proj_{uuid4().hex[:10]}"
    settings = SETTINGS.with_changes(
        store_schema=f"{name}_store",
        read_schema=f"{name}_read",
        redis_prefix=name,
        topic_prefix=topics.prefix,
        kafka_bootstrap_servers=broker.bootstrap_servers,
    )
    store = open_store(settings)
    environment = Env(name, settings, store, broker.bootstrap_servers, topics)
    try:
        yield environment
    finally:
        for close in reversed(environment.closing):
            with contextlib.suppress(Exception):
                close()
        store.close()
        drop_everything(name)


def read_topic(bootstrap: str, topic: str) -> list[Message]:
    """Everything in ``topic`` up to each partition's end (the EOF of its fetches)."""
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
        open_ = set(metadata.topics[topic].partitions)
        reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in open_])
        out: list[Message] = []
        deadline = time.monotonic() + 30
        while open_:
            assert time.monotonic() < deadline, f"no end of {topic} within 30s"
            message = reader.poll(0.1)
            if message is None:
                continue
            error = message.error()
            if error is None:
                out.append(message)
            elif error.code() == KafkaError._PARTITION_EOF:
                open_.discard(message.partition() or 0)
            else:
                raise KafkaException(error)
        return out
    finally:
        reader.close()


def in_kafka_order(messages: list[EventMessage]) -> list[EventMessage]:
    """A legal but unkind delivery order: each aggregate's events in order, the
    aggregates one after the other, the last written first and jobs last (as when
    their partitions are fetched in that order)."""
    by_aggregate: dict[UUID, list[EventMessage]] = {}
    for m in messages:
        by_aggregate.setdefault(m.aggregate_id, []).append(m)
    order = sorted(
        by_aggregate.values(), key=lambda ms: (ms[0].type.startswith("Job."), -ms[-1].position)
    )
    return [m for ms in order for m in ms]


# ---- tests ---------------------------------------------------------------------------------


def test_read_models_fed_through_kafka_equal_a_rebuild_from_the_store(env: Env) -> None:
    env.writer.scenario()  # before the projectors start: they catch up from the store
    postgres = env.projector(env.postgres())
    cache = env.projector(env.redis())
    relay = env.relay()
    with running(relay, postgres, cache):
        wait_for(lambda: postgres.assigned() and cache.assigned(), JOIN, "partitions")
        first = env.rebuilt()
        wait_for(lambda: env.dumps() == first, 30, "the first catch-up")

        kafka_only = time.monotonic()
        before = len(env.messages())
        env.writer.scenario()  # now through Kafka alone
        spots = env.writer.spots(4)
        for _ in range(3):
            env.writer.heartbeats(spots)
        everything = len(env.messages())
        expected = env.rebuilt()
        wait_for(lambda: env.dumps() == expected, 30, "the read models to follow Kafka")
        # everything came through Kafka, the first part again (a new group starts early)
        for projector in (postgres, cache):
            wait_for(
                functools.partial(lambda p: p.applied_from_kafka >= everything, projector),
                30,
                "every event in Kafka",
            )
            assert projector.catch_ups_since(kafka_only) == 0
            assert projector.dead_lettered == 0
    assert everything - before > 40
    postgres_rows, redis_keys = expected
    assert len(postgres_rows["jobs"]) == 4 and len(postgres_rows["spots"]) == 10
    assert {row[1] for row in postgres_rows["jobs"]} == {"DONE", "RUNNING"}
    assert any(":job:" in key for key in redis_keys) and ":counts" in redis_keys
    # Seed 002's tables: four runs (two per scenario), their attempts, leases and events.
    states = sorted(row[5] for row in postgres_rows["workflow_instances"])
    assert states == ["CANCELLED", "CANCELLED", "COMPLETED", "COMPLETED"]
    assert {row[5] for row in postgres_rows["task_executions"]} >= {"COMPLETED", "FAILED"}
    assert len(postgres_rows["events"]) > 10 and postgres_rows["execution_leases"]
    # Each instance's sequence number is its run's version, and each event has its row.
    numbers: dict[Any, list[int]] = {}
    for row in postgres_rows["events"]:
        numbers.setdefault(row[1], []).append(row[2])
    for row in postgres_rows["workflow_instances"]:
        version = len(env.store.stored_events(UUID(str(row[0]))))
        assert row[6] == version, row
        assert sorted(numbers[row[0]]) == list(range(1, version + 1))
    assert redis_keys[":workflow_runs"] == {"RUNNING": "0", "COMPLETED": "2", "CANCELLED": "2"}
    others = [
        k
        for k in redis_keys
        if not k.startswith((":job:", ":spot:", ":counts", ":applied", ":workflow_runs"))
    ]
    assert not others, f"Redis keys no dashboard reads: {others}"
    assert env.dumps() == expected  # and it stays so


def test_events_of_different_aggregates_apply_in_any_order(env: Env) -> None:
    """Kafka keeps each aggregate's order (one key, one partition), not the store's."""
    env.writer.scenario()
    messages = env.messages()
    expected = env.rebuilt()
    shuffled = in_kafka_order(messages)
    assert shuffled[-1].type == "Job.Created" and shuffled != messages
    one_by_one = (env.postgres(f"{env.name}_one"), env.redis(f"{env.name}_one"))
    together = (env.postgres(f"{env.name}_all"), env.redis(f"{env.name}_all"))
    for model in (*one_by_one, *together):
        model.create()
    for m in shuffled:
        for model in one_by_one:
            assert model.apply([m]) == []
    for model in together:
        assert model.apply(shuffled) == []
    assert (one_by_one[0].dump(), one_by_one[1].dump()) == expected
    assert (together[0].dump(), together[1].dump()) == expected


def test_blocks_applied_before_their_job_take_the_sweep_from_the_store_once(env: Env) -> None:
    """A job's blocks carry no sweep, and its Job.Created may come later (another partition)."""
    tasks = 1100  # three blocks
    job = env.writer.job(tasks)
    blocks = [m for m in env.messages() if m.type == "TaskBlock.Created"]
    assert len(blocks) == 3 and all("sweep" not in m.data for m in blocks)
    reader, reads = StoreReader(env.store), list[UUID]()

    def first_event(uuid: UUID) -> EventMessage | None:
        reads.append(uuid)
        return reader.first_event(uuid)

    model = PostgresReadModel(env.settings.database_url, f"{env.name}_early", first_event)
    env.closing.append(model.close)
    model.create()
    for m in blocks:
        assert model.apply([m]) == []
    assert reads == [parse_job_id(job)]  # one read for the three blocks
    with model.conn.transaction():
        rows = model.conn.execute(
            sql.SQL(
                "SELECT idx, algorithm, iterations, agents, dimension FROM {}.tasks ORDER BY idx"
            ).format(sql.Identifier(f"{env.name}_early"))
        ).fetchall()
    expected = sweep(tasks)
    assert rows == [
        (i, p.algorithm, p.iterations, p.agents, p.dimension)
        for i, p in ((i, expected.params(i)) for i in range(tasks))
    ]


def test_redelivered_and_older_events_change_nothing(env: Env) -> None:
    env.writer.scenario()
    relay_all(env.relay())
    codec = Codec()
    delivered = [
        codec.decode(m.value() or b"")
        for topic in env.topics.event_topics
        for m in read_topic(env.bootstrap, topic)
    ]
    assert len(delivered) == len(env.messages())
    expected = env.rebuilt()
    models = (env.postgres(), env.redis())
    for model in models:
        model.create()
        assert model.apply(delivered) == []  # the first delivery, in Kafka's order
    assert (models[0].dump(), models[1].dump()) == expected

    for model in models:
        assert model.apply(delivered) == []  # the same batch again
        assert model.apply(list(reversed(delivered))) == []  # old versions, out of order
        for m in delivered[::7]:
            assert model.apply([m]) == []  # one at a time
    assert (models[0].dump(), models[1].dump()) == expected


def test_an_event_of_a_type_no_model_handles_changes_nothing_and_fails_nothing(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer writer's block event, shaped like a failure: ignored, not counted, not a gap."""
    env.writer.scenario()
    messages = env.messages()
    expected = env.rebuilt()
    failed = next(m for m in reversed(messages) if m.type == "TaskBlock.Failed")
    block = failed.aggregate_id
    last = max(m.version for m in messages if m.aggregate_id == block)
    unknown = [
        dataclasses.replace(failed, type="TaskBlock.Split", version=last + n) for n in (1, 2, 3)
    ]
    models = (env.postgres(), env.redis())
    with caplog.at_level(logging.WARNING, logger="projections.dispatch"):
        for model in models:
            model.create()
            assert model.apply(messages) == []
            assert model.apply(unknown[:2]) == []  # no error, and no gap after them
            assert model.apply(unknown[2:]) == []
    assert env.applied(block) == (last + 3, last + 3)  # their versions are applied
    postgres, cache = models[0].dump(), models[1].dump()
    assert postgres == expected[0]
    assert cache.pop(":applied") != expected[1].pop(":applied")
    assert cache == expected[1], "an unknown event changed the dashboards"
    warned = [r.getMessage() for r in caplog.records if "TaskBlock.Split" in r.getMessage()]
    assert len(warned) == 2, f"not one warning per model: {warned}"


def test_a_gap_is_healed_from_the_store(env: Env) -> None:
    (spot,) = env.writer.spots(1)
    uuid = parse_spot_id(spot)
    relay = env.relay()
    relay_all(relay)
    postgres, cache = env.projector(env.postgres()), env.projector(env.redis())
    with running(postgres, cache):
        wait_for(lambda: postgres.assigned() and cache.assigned(), JOIN, "partitions")
        wait_for(lambda: env.applied(uuid) == (1, 1), 30, "the spot's registration")

        kafka_only = time.monotonic()
        for _ in range(3):
            env.writer.heartbeats([spot])  # versions 2, 3, 4: in the store, not in Kafka
        latest = env.messages()[-1]
        assert (latest.aggregate_id, latest.version) == (uuid, 4)
        producer = Producer(producer_config(env.bootstrap))
        producer.produce(
            env.topics.topic_for(latest.type),
            key=str(uuid).encode(),
            value=Codec().encode(latest),
        )
        assert producer.flush(10) == 0

        wait_for(lambda: env.applied(uuid) == (4, 4), 30, "the gap to be healed")
        assert env.dumps() == env.rebuilt()
        assert postgres.catch_ups_since(kafka_only) == 0  # healed, not caught up
        assert cache.catch_ups_since(kafka_only) == 0

    # the read models see the gap for what it is
    fresh = env.postgres(f"{env.name}_fresh")
    fresh.create()
    assert fresh.apply([latest]) == [latest]
    assert env.redis(f"{env.name}_fresh").apply([latest]) == [latest]


def test_poison_message_is_dead_lettered_and_its_aggregate_reread(env: Env) -> None:
    env.writer.scenario()
    relay = env.relay()
    relay_all(relay)
    postgres, cache = env.projector(env.postgres()), env.projector(env.redis())
    with running(postgres, cache):
        wait_for(lambda: postgres.assigned() and cache.assigned(), JOIN, "partitions")
        first = env.rebuilt()
        wait_for(lambda: env.dumps() == first, 30, "the first catch-up")

        kafka_only = time.monotonic()
        job = parse_job_id(env.writer.job(6))  # stored, not relayed
        garbage = b"\x00 this is not an Avro envelope \xff"
        producer = Producer(producer_config(env.bootstrap))
        producer.produce(env.topics.workload, key=str(job).encode(), value=garbage)
        assert producer.flush(10) == 0

        dlq = env.topics.dead_letter(env.topics.workload)

        def two_letters() -> list[Message]:
            got = read_topic(env.bootstrap, dlq)
            return got if len(got) == 2 else []

        letters = wait_for(two_letters, 30, "a dead letter from each projector")
        for letter in letters:
            headers = {k: v.decode() for k, v in letter.headers() or []}
            assert letter.value() == garbage
            assert letter.key() == str(job).encode()
            assert headers["reason"].startswith("undecodable message")
            assert headers["source.topic"] == env.topics.workload
        groups = {dict(letter.headers() or [])["consumer.group"] for letter in letters}
        assert groups == {postgres.group.encode(), cache.group.encode()}
        # the job the key names was read from the store: its creation never went to Kafka
        wait_for(lambda: env.applied(job) == (1, 1), 10, "the job to be re-read")
        assert postgres.catch_ups_since(kafka_only) == cache.catch_ups_since(kafka_only) == 0

        # and the projectors carry on with good events
        relay_all(relay)
        env.writer.heartbeats(env.writer.spots(2))
        relay_all(relay)
        expected = env.rebuilt()
        wait_for(lambda: env.dumps() == expected, 30, "later events")
        assert postgres.dead_lettered == cache.dead_lettered == 1
        assert postgres.catch_ups_since(kafka_only) == cache.catch_ups_since(kafka_only) == 0


def test_redis_that_lost_its_keys_is_rebuilt_by_the_next_catch_up(env: Env) -> None:
    env.writer.scenario()
    model = env.redis()
    projector = Projector(model, env.store, env.bootstrap, env.topics)
    last = projector.catch_up()
    assert last == env.messages()[-1].position
    _, expected = env.rebuilt()
    assert model.dump() == expected and not model.lost()

    names = list(model.client.scan_iter(match=f"{env.settings.redis_prefix}:*"))
    assert f"{env.settings.redis_prefix}:meta" in names
    model.client.delete(*names)  # a Redis restart: nothing kept
    assert model.lost() and model.dump() == {}

    env.writer.heartbeats(env.writer.spots(1))  # and the store moved on meanwhile
    assert projector.catch_up() == env.messages()[-1].position
    _, expected = env.rebuilt()
    assert model.dump() == expected and not model.lost()
    assert model.checkpoint() == env.messages()[-1].position


def test_read_models_see_a_new_event_within_seconds_and_record_the_lag(env: Env) -> None:
    (spot,) = env.writer.spots(1)
    uuid = parse_spot_id(spot)
    url, prefix = env.settings.redis_url, env.settings.redis_prefix
    postgres = env.projector(env.postgres(), lag=LagSamples(url, prefix, "postgres"))
    cache = env.projector(env.redis(), lag=LagSamples(url, prefix, "redis"))
    with running(env.relay(), postgres, cache):
        wait_for(lambda: postgres.assigned() and cache.assigned(), JOIN, "partitions")
        wait_for(
            lambda: postgres.applied_from_kafka >= 1 and cache.applied_from_kafka >= 1,
            30,
            "the registration through Kafka",
        )
        kafka_only = time.monotonic()
        seen_after: list[float] = []
        for version in range(2, 7):
            written = time.monotonic()
            env.writer.heartbeats([spot])
            wanted = (version, version)
            wait_for(lambda: env.applied(uuid) == wanted, 5, f"version {version}")  # noqa: B023
            seen_after.append(time.monotonic() - written)
        assert postgres.catch_ups_since(kafka_only) == cache.catch_ups_since(kafka_only) == 0
        assert postgres.applied_from_kafka >= 6 and cache.applied_from_kafka >= 6

    assert max(seen_after) < 5, seen_after
    client = redis.Redis.from_url(url, decode_responses=True)
    with contextlib.closing(client):
        for model in ("postgres", "redis"):
            samples = [float(s) for s in client.lrange(f"{prefix}:metrics:lag_ms:{model}", 0, -1)]
            assert len(samples) >= 6, (model, samples)
            assert all(-50 < s < 5000 for s in samples[:5]), (model, samples)


def test_a_catch_up_until_a_position_applies_nothing_after_it(env: Env) -> None:
    """The periodic reconciliation leaves events newer than its horizon to Kafka."""
    (spot,) = env.writer.spots(1)
    settled = env.messages()[-1].position
    env.writer.heartbeats([spot])
    env.writer.heartbeats([spot])
    model = env.postgres()
    model.create()
    projector = Projector(model, env.store, env.bootstrap, env.topics)
    assert projector.catch_up(until=settled) == settled
    assert model.checkpoint() == settled
    assert env.applied(parse_spot_id(spot))[0] == 1  # registered, no heartbeat yet
    assert projector.catch_up() == env.messages()[-1].position
    assert env.applied(parse_spot_id(spot))[0] == 3


def test_lag_samples_are_buffered_and_flushed(env: Env) -> None:
    env.writer.spots(2)
    messages = env.messages()
    url, prefix = env.settings.redis_url, env.settings.redis_prefix
    lag = LagSamples(url, prefix, "postgres")
    key = f"{prefix}:metrics:lag_ms:postgres"
    lag.record(messages[:1])  # the first goes at once
    assert lag.client.llen(key) == 1
    lag.record(messages[1:])  # within FLUSH_EVERY of it: kept back
    assert lag.client.llen(key) == 1
    lag.flush()
    assert lag.client.llen(key) == len(messages)
    samples = [float(s) for s in lag.client.lrange(key, 0, -1)]
    assert all(0 <= s < 60_000 for s in samples), samples
