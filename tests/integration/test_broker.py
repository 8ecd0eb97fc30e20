"""The embedded broker, the topic catalogue and the client configs, against real Tansu.

Besides checking our own code these tests pin down how Tansu 0.6.0 and
librdkafka behave where the relay and the projectors depend on it, above all
what happens to clients when the memory-only broker restarts empty. Findings:

* A **consumer** recovers by itself: it gets ``_TRANSPORT`` (-195) and
  ``_ALL_BROKERS_DOWN`` (-187) through ``error_cb`` (neither fatal), rejoins
  its group (about 3 s) once the topics exist again and, its group's offsets
  being gone, reads the new log from the start (``auto.offset.reset``).
* An idempotent **producer** created before the restart does *not* recover.
  The new broker answers its every ProduceRequest with UNKNOWN_PRODUCER_ID
  (59); librdkafka handles that internally (bumps the epoch, retries) without a
  word to ``error_cb`` or the delivery callback, forever. The only signals are
  ``_ALL_BROKERS_DOWN`` (-187, not fatal) in ``error_cb`` when the connection
  drops, then ``_MSG_TIMED_OUT`` (-192, not fatal, not retriable) in the
  delivery report of every message, after ``message.timeout.ms``. Nothing is
  ever raised and ``fatal()`` is never true, so a relay that replaces its
  producer only when it is fatal is stuck for good. The cure: ``purge()`` it
  and create a new one (``InitProducerId`` on the new broker).
* Worse, the fresh broker hands out producer ids from the start again, so a
  *new* producer (any process) gets the id a stale one still uses. The stale
  producer's messages are then fenced (PRODUCER_FENCED, 90, not fatal, in the
  delivery report), or accepted, or **dropped as duplicates while their
  delivery reports say success** (offset unknown or wrong). Every process must
  therefore drop its pre-restart producers as soon as it sees the broker go
  away (``_ALL_BROKERS_DOWN`` / ``_TRANSPORT`` in ``error_cb``) or a batch time
  out, and must not trust deliveries made across a restart; the restart is
  visible as a new cluster id (``AdminClient.describe_cluster()``) and new
  topic ids.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from uuid import uuid4

import pytest
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, ConfigResource

from service.processes import BrokerKeeper
from streaming.broker import (
    BrokerError,
    EmbeddedBroker,
    broker_reachable,
    broker_reachable_async,
    free_port,
)
from streaming.clientlog import CLIENT_LOG
from streaming.topics import (
    AGENT_LIFECYCLE_PARTITIONS,
    TOPIC_SETTINGS,
    WORKLOAD_PARTITIONS,
    TopicCatalogue,
    TopicError,
    consumer_config,
    ensure_topics,
    producer_config,
)

pytestmark = pytest.mark.integration

Report = tuple[KafkaError | None, Message]


# ---- helpers --------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def produce(
    producer: Producer,
    topic: str,
    items: Sequence[tuple[bytes | None, bytes]],
    partition: int | None = None,
    flush_timeout: float = 15.0,
) -> list[Report]:
    """Produce ``items`` (key, value) and wait until each has its delivery report."""
    reports: list[Report] = []

    def delivered(error: KafkaError | None, message: Message) -> None:
        reports.append((error, message))

    for key, value in items:
        if partition is None:
            producer.produce(topic, key=key, value=value, on_delivery=delivered)
        else:
            producer.produce(
                topic, key=key, value=value, partition=partition, on_delivery=delivered
            )
    remaining = producer.flush(flush_timeout)
    assert remaining == 0, f"{remaining} messages still undelivered after {flush_timeout}s"
    assert len(reports) == len(items)
    return reports


def consume(consumer: Consumer, count: int, timeout: float) -> list[Message]:
    """Poll until ``count`` messages arrived; fail on a consumer error or the deadline."""
    deadline = time.monotonic() + timeout
    messages: list[Message] = []
    while len(messages) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"consumed {len(messages)} of {count} messages within {timeout}s")
        message = consumer.poll(min(left, 0.1))
        if message is None:
            continue
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                continue
            pytest.fail(f"consumer error: {error}")
        messages.append(message)
    return messages


def consume_values(consumer: Consumer, wanted: set[bytes], timeout: float) -> list[bytes]:
    """Poll until every value of ``wanted`` was seen, ignoring transient errors."""
    deadline = time.monotonic() + timeout
    seen: list[bytes] = []
    while not wanted <= set(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"missing {sorted(wanted - set(seen))} after {timeout}s; saw {seen}")
        message = consumer.poll(min(left, 0.1))
        if message is not None and message.error() is None:
            seen.append(message.value() or b"")
    return seen


def read_partition(bootstrap: str, topic: str, partition: int) -> list[bytes]:
    """Everything in one partition, read without a group up to its end.

    The end is the partition EOF librdkafka derives from the fetch's high
    watermark: Tansu's ListOffsets answer for the end is not to be trusted (see
    :func:`test_tansu_reports_the_wrong_end_offset_after_a_multi_record_batch`).
    """
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    try:
        reader.assign([TopicPartition(topic, partition, OFFSET_BEGINNING)])
        values: list[bytes] = []
        deadline = time.monotonic() + 15
        while True:
            assert time.monotonic() < deadline, f"no end of {topic}[{partition}] within 15s"
            message = reader.poll(0.1)
            if message is None:
                continue
            error = message.error()
            if error is None:
                values.append(message.value() or b"")
            elif error.code() == KafkaError._PARTITION_EOF:
                return values
            else:
                pytest.fail(f"reading {topic}[{partition}]: {error}")
    finally:
        reader.close()


def topic_names(bootstrap: str) -> set[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})
    return set(admin.list_topics(timeout=10).topics)


def wait_for_assignment(consumer: Consumer, assigned: list[TopicPartition], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not assigned:
        if time.monotonic() >= deadline:
            pytest.fail(f"the consumer got no partitions within {timeout}s")
        message = consumer.poll(0.05)
        assert message is None or message.error() is not None, "a message before assignment"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, for tests that restart it."""
    with EmbeddedBroker() as embedded:
        yield embedded


class ClientLog(logging.Handler):
    """Collects librdkafka's log lines (passed to a client as ``logger=``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.logger = logging.getLogger(f"test.librdkafka.{uuid4().hex}")
        self.logger.propagate = False
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def warnings(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.WARNING]


# ---- the embedded broker ----------------------------------------------------------------


def test_broker_answers_on_its_port_with_its_cluster_id(broker: EmbeddedBroker) -> None:
    assert broker.running
    assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    metadata = admin.list_topics(timeout=10)
    assert [(b.host, b.port) for b in metadata.brokers.values()] == [("127.0.0.1", broker.port)]
    assert admin.describe_cluster().result(timeout=10).cluster_id == broker.cluster_id


def test_broker_restarts_on_the_same_port_and_stops(own_broker: EmbeddedBroker) -> None:
    port, pid, cluster = own_broker.port, own_broker.pid, own_broker.cluster_id
    own_broker.restart()
    assert (own_broker.port, own_broker.running) == (port, True)
    assert own_broker.pid != pid
    assert own_broker.cluster_id != cluster
    assert topic_names(own_broker.bootstrap_servers) == set()

    own_broker.stop()
    own_broker.stop()  # idempotent
    assert not own_broker.running
    assert own_broker.pid is None
    with pytest.raises(Exception):  # noqa: B017 - refused, or a metadata timeout
        AdminClient(
            {"bootstrap.servers": own_broker.bootstrap_servers, "log_level": 0}
        ).list_topics(timeout=1)


def test_broker_that_exits_at_start_is_reported_with_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\necho 'cannot start: out of cheese' >&2\nexit 3\n")
    fake.chmod(0o755)
    broker = EmbeddedBroker(port=free_port(), binary=str(fake), startup_timeout=10)
    with pytest.raises(BrokerError, match=r"exited with code 3(.|\n)*out of cheese"):
        broker.start()
    broker.stop()
    assert not broker.running


def test_broker_refuses_a_port_in_use() -> None:
    with EmbeddedBroker() as first, pytest.raises(BrokerError, match="already in use"):
        EmbeddedBroker(port=first.port, startup_timeout=5).start()


# ---- topics ------------------------------------------------------------------------------


def test_catalogue_names() -> None:
    catalogue = TopicCatalogue("tadpole")
    assert catalogue.workload == "tadpole.workload"
    assert catalogue.agent_lifecycle == "tadpole.agent_lifecycle"
    assert catalogue.dead_letter(catalogue.workload) == "tadpole.workload.dlq"
    events = (
        "tadpole.workload",
        "tadpole.agent_lifecycle",
        "tadpole.system_events",
        "tadpole.mesh_coordination",
        "tadpole.performance_metrics",
    )
    assert set(catalogue.event_topics) == set(events)
    assert set(catalogue.all_topics) == {*events, *(f"{t}.dlq" for t in events)}
    for bad in ("", "has space", "slash/no", "x" * 300):
        with pytest.raises(ValueError):
            TopicCatalogue(bad)


def test_ensure_topics_creates_partitions_and_configs(
    broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    bootstrap = broker.bootstrap_servers
    admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})
    metadata = admin.list_topics(timeout=10)
    partitions = {name: len(metadata.topics[name].partitions) for name in topics.all_topics}
    expected = {name: settings.partitions for name, settings in TOPIC_SETTINGS.items()}
    assert partitions == {
        **{topics.topic(name): n for name, n in expected.items()},
        **{topics.dead_letter(topics.topic(name)): 1 for name in expected},
    }
    assert (WORKLOAD_PARTITIONS, AGENT_LIFECYCLE_PARTITIONS) == (6, 4)

    futures = admin.describe_configs(
        [ConfigResource("topic", topics.topic(name)) for name in expected]
    )
    configs = {
        resource.name: {k: v.value for k, v in future.result(timeout=10).items()}
        for resource, future in futures.items()
    }
    assert configs[topics.workload]["retention.ms"] == "604800000"
    assert configs[topics.agent_lifecycle]["retention.ms"] == "1209600000"
    assert configs[topics.workload]["cleanup.policy"] == "delete"
    metrics = configs[topics.topic("performance_metrics")]  # seed 001's settings, as given
    assert (metrics["retention.ms"], metrics["cleanup.policy"]) == ("2592000000", "compact")

    ensure_topics(bootstrap, topics)  # again: nothing to do, no error
    assert len(admin.list_topics(timeout=10).topics[topics.workload].partitions) == 6


def test_ensure_topics_races_safely(broker: EmbeddedBroker) -> None:
    catalogue = TopicCatalogue(f"race{uuid4().hex[:8]}")
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            ensure_topics(broker.bootstrap_servers, catalogue)
        except BaseException as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert set(catalogue.all_topics) <= topic_names(broker.bootstrap_servers)


def test_clients_do_not_auto_create_topics(broker: EmbeddedBroker) -> None:
    """Tansu would create a missing topic with 4 partitions on first use."""
    bootstrap = broker.bootstrap_servers
    missing = f"missing{uuid4().hex[:8]}"
    producer = Producer(producer_config(bootstrap, **{"message.timeout.ms": 1000}))
    reports = produce(producer, missing, [(b"k", b"v")], flush_timeout=10)
    assert reports[0][0] is not None
    consumer = Consumer(consumer_config(bootstrap, f"{missing}.g"))
    try:
        consumer.subscribe([missing])
        message = consumer.poll(1.0)
        assert message is None or message.error() is not None
    finally:
        consumer.close()
    assert missing not in topic_names(bootstrap)


def test_ensure_topics_on_an_unreachable_broker_raises_topic_error() -> None:
    started = time.monotonic()
    with pytest.raises(TopicError, match="cannot list the topics"):
        ensure_topics(f"127.0.0.1:{free_port()}", TopicCatalogue("nobody"), timeout=1.5)
    assert time.monotonic() - started < 10


# ---- producing and consuming ------------------------------------------------------------


def test_keyed_messages_round_trip_through_a_consumer_group(
    broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    bootstrap = broker.bootstrap_servers
    keys = [f"aggregate-{i}".encode() for i in range(8)]
    items: list[tuple[bytes | None, bytes]] = [
        (key, b"%s#%d" % (key, n))
        for n in range(25)
        for key in keys  # keys interleaved
    ]
    client_errors: list[KafkaError] = []
    producer_log, consumer_log = ClientLog(), ClientLog()

    producer = Producer(
        producer_config(bootstrap, error_cb=client_errors.append, logger=producer_log.logger)
    )
    reports = produce(producer, topics.workload, items)
    assert [error for error, _ in reports if error is not None] == []
    partition_of: dict[bytes, set[int]] = {}
    offsets_of: dict[bytes, list[int]] = {}
    for _, message in reports:
        partition_of.setdefault(message.key() or b"", set()).add(message.partition() or 0)
        offsets_of.setdefault(message.key() or b"", []).append(message.offset() or 0)
    assert all(len(p) == 1 for p in partition_of.values()), partition_of
    assert all(o == sorted(o) for o in offsets_of.values())
    assert len(set().union(*partition_of.values())) > 1  # the keys spread over partitions

    assigned: list[TopicPartition] = []
    consumer = Consumer(
        consumer_config(
            bootstrap,
            f"{topics.prefix}.test",
            error_cb=client_errors.append,
            logger=consumer_log.logger,
        )
    )
    consumer.subscribe(
        [topics.workload], on_assign=lambda _c, partitions: assigned.extend(partitions)
    )
    try:
        messages = consume(consumer, len(items), timeout=30)
        consumer.commit(asynchronous=False)

        assert sorted((m.key(), m.value()) for m in messages) == sorted(items)
        for key in keys:
            mine = [m for m in messages if m.key() == key]
            assert [m.value() for m in mine] == [v for k, v in items if k == key]
            assert {m.partition() for m in mine} == partition_of[key]
        assert sorted(tp.partition for tp in assigned) == list(range(WORKLOAD_PARTITIONS))

        consumed_to: dict[int, int] = {}
        for m in messages:
            consumed_to[m.partition() or 0] = max(
                consumed_to.get(m.partition() or 0, 0), m.offset() or 0
            )
        everything = [TopicPartition(topics.workload, p) for p in range(WORKLOAD_PARTITIONS)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(everything, timeout=10)}
        assert committed == {
            p: consumed_to[p] + 1 if p in consumed_to else OFFSET_INVALID
            for p in range(WORKLOAD_PARTITIONS)
        }

        extra = consumer.poll(0.5)  # nothing more: no duplicates
        assert extra is None or extra.error() is not None
    finally:
        consumer.close()
    assert client_errors == []
    assert producer_log.warnings() == [] and consumer_log.warnings() == []


def test_consumer_joins_quickly_and_single_messages_arrive_with_low_lag(
    broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    """One message at a time, produce → poll until received, as the read models see it."""
    bootstrap = broker.bootstrap_servers
    producer = Producer(producer_config(bootstrap))
    consumer = Consumer(consumer_config(bootstrap, f"{topics.prefix}.lag"))
    assigned: list[TopicPartition] = []
    started = time.monotonic()
    consumer.subscribe([topics.workload], on_assign=lambda _c, ps: assigned.extend(ps))
    try:
        wait_for_assignment(consumer, assigned, timeout=20)
        join = time.monotonic() - started
        # Tansu holds the first join for about session.timeout.ms / 2: 3 s with our
        # 6000 ms, 23 s with librdkafka's default 45000 ms
        assert join < 6.0, f"group join took {join:.1f}s"

        produce(producer, topics.workload, [(b"warm-up", b"warm-up")])
        consume(consumer, 1, timeout=10)

        latencies: list[float] = []
        for i in range(500):
            value = b"single-%d" % i
            sent = time.perf_counter()
            producer.produce(topics.workload, key=b"k%d" % (i % 50), value=value)
            producer.poll(0)
            deadline = sent + 5
            while True:
                message = consumer.poll(0.1)
                if message is not None and message.error() is None:
                    assert message.value() == value
                    break
                assert time.perf_counter() < deadline, f"message {i} not received within 5s"
            latencies.append((time.perf_counter() - sent) * 1000)
    finally:
        consumer.close()
        producer.flush(5)

    latencies.sort()
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    print(f"\njoin {join:.2f}s; produce→consume p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    # fetch.wait.max.ms bounds this: Tansu answers an empty fetch only after the full wait
    assert p99 < 100, f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"


def test_group_members_share_the_partitions_and_take_them_back(
    broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    """The assignment strategy works with Tansu (cooperative-sticky does not).

    With cooperative-sticky, the partitions the first member gives up when a
    second one joins are assigned to nobody.
    """
    bootstrap = broker.bootstrap_servers
    group = f"{topics.prefix}.pair"
    everything = set(range(WORKLOAD_PARTITIONS))
    first = Consumer(consumer_config(bootstrap, group))
    second = Consumer(consumer_config(bootstrap, group))
    members: list[Consumer | None] = [first, second]
    received: dict[int, list[tuple[int, bytes]]] = {0: [], 1: []}

    def poll_both() -> None:
        for index, member in enumerate(members):
            if member is None:
                continue
            message = member.poll(0.02)
            if message is not None and message.error() is None:
                received[index].append((message.partition() or 0, message.value() or b""))

    def owned(member: Consumer) -> set[int]:
        return {tp.partition for tp in member.assignment()}

    def poll_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            poll_both()

    try:
        first.subscribe([topics.workload])
        poll_until(lambda: owned(first) == everything, 20, "the first member's assignment")
        second.subscribe([topics.workload])
        poll_until(
            lambda: (
                bool(owned(second))
                and owned(first) | owned(second) == everything
                and not owned(first) & owned(second)
            ),
            30,
            "the partitions to be shared",
        )
        split = (owned(first), owned(second))

        values = [b"shared-%d" % i for i in range(60)]
        produce(Producer(producer_config(bootstrap)), topics.workload, [(v, v) for v in values])
        poll_until(
            lambda: {v for r in received.values() for _, v in r} >= set(values),
            30,
            "every message to be consumed by one member or the other",
        )
        assert {p for p, _ in received[0]} <= split[0]
        assert {p for p, _ in received[1]} <= split[1]
        assert len(received[0]) + len(received[1]) == len(values)  # no duplicates

        second.close()
        members[1] = None
        poll_until(lambda: owned(first) == everything, 30, "the first member to take all back")
    finally:
        first.close()
        if members[1] is not None:
            second.close()


def test_tansu_reports_the_wrong_end_offset_after_a_multi_record_batch(
    broker: EmbeddedBroker, topics: TopicCatalogue
) -> None:
    """Tansu 0.6.0's ListOffsets(latest) is the last *batch's* base offset + 1.

    So ``query_watermark_offsets``/``get_watermark_offsets`` (lag metrics,
    ``auto.offset.reset=latest``) undercount after a batch of several records;
    fetches are right (their high watermark is). If this fails, Tansu fixed it.
    """
    bootstrap = broker.bootstrap_servers
    producer = Producer(producer_config(bootstrap))
    produce(producer, topics.workload, [(None, b"batched-%d" % i) for i in range(5)], partition=0)
    reader = Consumer({"bootstrap.servers": bootstrap, "group.id": f"wm-{uuid4().hex}"})
    try:
        ends = reader.get_watermark_offsets(TopicPartition(topics.workload, 0), timeout=10)
    finally:
        reader.close()
    assert len(read_partition(bootstrap, topics.workload, 0)) == 5
    assert ends == (0, 1)  # should be (0, 5)


# ---- a broker that restarts empty ---------------------------------------------------------


def test_restarted_broker_is_empty_until_ensure_topics_and_consumers_recover(
    own_broker: EmbeddedBroker,
) -> None:
    bootstrap = own_broker.bootstrap_servers
    catalogue = TopicCatalogue("restart")
    group = "restart.projector"
    ensure_topics(bootstrap, catalogue)
    producer = Producer(producer_config(bootstrap))
    produce(producer, catalogue.workload, [(b"k%d" % i, b"before-%d" % i) for i in range(10)])
    del producer

    consumer_errors: list[KafkaError] = []
    consumer = Consumer(consumer_config(bootstrap, group, error_cb=consumer_errors.append))
    consumer.subscribe(list(catalogue.event_topics))
    try:
        consume(consumer, 10, timeout=30)
        consumer.commit(asynchronous=False)
        cluster = own_broker.cluster_id

        own_broker.restart()

        assert own_broker.cluster_id != cluster
        assert topic_names(bootstrap) == set()  # no topics: nothing survived
        ensure_topics(bootstrap, catalogue)
        assert set(catalogue.all_topics) <= topic_names(bootstrap)

        # the group's offsets went with the old broker
        lookup = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:
            everything = [TopicPartition(catalogue.workload, p) for p in range(6)]
            offsets = lookup.committed(everything, timeout=10)
            assert {tp.offset for tp in offsets} == {OFFSET_INVALID}
        finally:
            lookup.close()

        # a new producer works at once; the old consumer rejoins and reads it by itself
        after = [(b"k%d" % i, b"after-%d" % i) for i in range(10)]
        reports = produce(Producer(producer_config(bootstrap)), catalogue.workload, after)
        assert [error for error, _ in reports if error is not None] == []
        seen = consume_values(consumer, {v for _, v in after}, timeout=30)
        assert not any(v.startswith(b"before-") for v in seen)
        assert {e.code() for e in consumer_errors} <= {
            KafkaError._TRANSPORT,
            KafkaError._ALL_BROKERS_DOWN,
        }
        assert not any(e.fatal() for e in consumer_errors)
    finally:
        consumer.close()


def test_producer_from_before_a_restart_is_stuck_until_replaced(
    own_broker: EmbeddedBroker,
) -> None:
    """The relay's case: its idempotent producer outlives the broker's state.

    Tansu answers the old producer id with UNKNOWN_PRODUCER_ID (59); librdkafka
    bumps the epoch and retries, silently and without end, so each message fails
    only at ``message.timeout.ms`` with ``_MSG_TIMED_OUT`` (-192), not fatal.
    ``error_cb`` saw ``_ALL_BROKERS_DOWN`` (-187), not fatal, when the broker
    went away. Nothing lands. A new producer works at once.
    """
    bootstrap = own_broker.bootstrap_servers
    catalogue = TopicCatalogue("stuck")
    ensure_topics(bootstrap, catalogue)
    callbacks: list[KafkaError] = []
    old = Producer(
        producer_config(bootstrap, error_cb=callbacks.append, **{"message.timeout.ms": 3000})
    )
    before = produce(old, catalogue.workload, [(b"key", b"before")])
    assert before[0][0] is None

    own_broker.restart()
    ensure_topics(bootstrap, catalogue)

    started = time.monotonic()
    reports = produce(
        old, catalogue.workload, [(b"key", b"after"), (None, b"unkeyed")], flush_timeout=15
    )
    codes = [error.code() if error else None for error, _ in reports]
    assert codes == [KafkaError._MSG_TIMED_OUT] * 2, reports
    assert not any(error.fatal() or error.retriable() for error, _ in reports if error)
    assert time.monotonic() - started >= 2.5  # failed only at message.timeout.ms
    assert KafkaError._ALL_BROKERS_DOWN in {e.code() for e in callbacks}
    assert not any(e.fatal() for e in callbacks)
    landed = [read_partition(bootstrap, catalogue.workload, p) for p in range(6)]
    assert landed == [[]] * 6

    # still stuck: a later message fails the same way
    again = produce(old, catalogue.workload, [(b"key", b"again")], flush_timeout=15)
    assert again[0][0] is not None and again[0][0].code() == KafkaError._MSG_TIMED_OUT

    # the cure: drop it (purge what it holds) and create a new one
    old.purge()
    old.flush(0)
    del old
    new = Producer(producer_config(bootstrap))
    fresh = produce(new, catalogue.workload, [(b"key", b"fresh")])
    assert fresh[0][0] is None
    partition = fresh[0][1].partition() or 0
    assert read_partition(bootstrap, catalogue.workload, partition) == [b"fresh"]


def test_stale_producer_collides_with_a_new_one_and_loses_messages_silently(
    own_broker: EmbeddedBroker,
) -> None:
    """Tansu restarts its producer ids, so a new producer gets the stale one's id.

    The stale producer's next messages carry sequence numbers the broker has
    already seen from the new one: they are dropped as duplicates, while their
    delivery reports say they were delivered. If this test starts failing, Tansu
    changed how it tracks producer ids: revisit the relay's recovery.
    """
    bootstrap = own_broker.bootstrap_servers
    catalogue = TopicCatalogue("collide")
    ensure_topics(bootstrap, catalogue)
    stale = Producer(producer_config(bootstrap))
    produce(stale, catalogue.workload, [(None, b"stale-before")], partition=0)

    own_broker.restart()
    ensure_topics(bootstrap, catalogue)
    new = Producer(producer_config(bootstrap))
    produce(new, catalogue.workload, [(None, b"new-%d" % i) for i in range(3)], partition=0)

    lost = produce(
        stale, catalogue.workload, [(None, b"stale-%d" % i) for i in range(2)], partition=0
    )
    assert [error for error, _ in lost] == [None, None]  # "delivered"...
    assert read_partition(bootstrap, catalogue.workload, 0) == [b"new-0", b"new-1", b"new-2"]
    stale.purge()


# ---- a broker that dies under `tadpole up` ---------------------------------------------------


def test_broker_reachable_follows_the_broker_and_answers_at_once_when_it_is_down(
    own_broker: EmbeddedBroker,
) -> None:
    bootstrap = own_broker.bootstrap_servers
    assert broker_reachable(bootstrap)
    assert asyncio.run(broker_reachable_async(bootstrap))
    dead = f"127.0.0.1:{free_port()}"
    assert broker_reachable(f"{dead},{bootstrap}")  # the first that answers

    own_broker.stop()
    started = time.monotonic()
    assert not broker_reachable(bootstrap)
    assert not asyncio.run(broker_reachable_async(f"{bootstrap},{dead}"))
    assert time.monotonic() - started < 0.2  # refused at once, no waiting out the timeout
    assert not broker_reachable("not a bootstrap string")

    own_broker.start()
    assert broker_reachable(bootstrap)


def test_keeper_restarts_a_killed_broker_on_its_port_with_its_topics_when_the_port_frees(
    own_broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap, port = own_broker.bootstrap_servers, own_broker.port
    catalogue = TopicCatalogue(f"keep{uuid4().hex[:8]}")
    clock = FakeClock()
    keeper = BrokerKeeper(own_broker, catalogue, first_pause=0.25, max_pause=2.0, clock=clock)
    keeper.check()
    assert keeper.restarts == 0  # running: nothing to do

    pid = own_broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not own_broker.running, 10, "the broker to die")
    holder = socket.socket()  # someone holds the port for a while
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", port))
    holder.listen()
    caplog.set_level(logging.WARNING, logger="service.processes")
    try:
        attempts = []
        for step in range(60):  # 6 s in steps of 0.1 s
            clock.now = 100 + step / 10
            before = len(caplog.records)
            keeper.check()
            if any("not back yet" in r.getMessage() for r in caplog.records[before:]):
                attempts.append(step / 10)
        # pauses of 0.25, 0.5, 1, 2, 2 s (checked every 0.1 s)
        assert attempts == [0.0, 0.3, 0.8, 1.8, 3.8, 5.8], attempts
        assert "exited with -9" in caplog.text
        assert not own_broker.running
    finally:
        holder.close()

    clock.now += 2.0
    keeper.check()
    assert keeper.restarts == 1
    assert own_broker.running and own_broker.bootstrap_servers == bootstrap
    assert set(catalogue.all_topics) <= topic_names(bootstrap)
    assert broker_reachable(bootstrap)
    keeper.check()
    assert keeper.restarts == 1


def test_client_configs_hold_back_repeated_refused_connection_lines() -> None:
    """librdkafka tries a dead broker every 250 ms (and logged it, 40 a second at 50 ms)."""
    lines = ClientLog()
    CLIENT_LOG.addHandler(lines)
    level, CLIENT_LOG.level = CLIENT_LOG.level, logging.DEBUG
    consumer = Consumer(consumer_config(f"127.0.0.1:{free_port()}", f"dead-{uuid4().hex}"))
    consumer.subscribe(["nowhere"])

    def refused() -> list[str]:
        return [r.getMessage() for r in lines.records if "Connection refused" in r.getMessage()]

    try:
        deadline = time.monotonic() + 15
        while not any("more like it" in line for line in refused()):
            assert time.monotonic() < deadline, refused()
            consumer.poll(0.05)
    finally:
        consumer.close()
        CLIENT_LOG.removeHandler(lines)
        CLIENT_LOG.setLevel(level)
    assert len(refused()) == 2, refused()
    held = int(re.search(r"\((\d+) more like it", refused()[1]).group(1))  # type: ignore[union-attr]
    assert held >= 10  # about 2 tries a second for each broker it knows, for 5 s
