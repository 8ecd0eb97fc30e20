"""The topic catalogue, topic creation, and the producer and consumer settings.

Each aggregate family names the topic its events go to
(:attr:`domain.family.Family.topic`); the catalogue knows every topic's settings
(:data:`TOPIC_SETTINGS`), names them from a prefix (``tadpole`` unless
configured), and gives each a dead-letter topic for messages that cannot be
decoded. Today:

==================================  ==========  ==================================
topic                               partitions  carries
==================================  ==========  ==================================
``{prefix}.workload``               6           jobs, task blocks, workflows
``{prefix}.system_events``          6           targets, contexts
``{prefix}.performance_metrics``    12          agents' and meshes' figures
                                                (compacted)
``{prefix}.mesh_coordination``      8           meshes, mesh-formation sagas
``{prefix}.agent_lifecycle``        4           spots, agents, spawn sagas
``{topic}.dlq``                     1           undecodable messages of ``{topic}``
==================================  ==========  ==================================

Each topic has seed 001's retention, compression and cleanup policy
(:data:`TOPIC_SETTINGS`).

Events are keyed by aggregate id, so one aggregate's events share a partition
and keep their order. :func:`ensure_topics` creates whatever is missing and is
safe to call at any time, e.g. after the embedded broker came back empty.

:func:`producer_config`, :func:`consumer_config` and :func:`admin_config` are
the client settings, all built on :func:`client_config` (which also routes
librdkafka's log lines through a throttle, :mod:`streaming.clientlog`),
checked against Tansu 0.6.0 (``tests/integration/test_broker.py``). Two of its
traits drive them: it auto-creates unknown topics with 4 partitions unless the
client opts out (all configs here send ``allow.auto.create.topics=false``, so
only :func:`ensure_topics` creates topics, with the right partition counts), and
a fetch that finds nothing waits the full ``fetch.wait.max.ms`` instead of being
woken by new data, so that setting is kept small for low lag.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException

# NewTopic is public in confluent_kafka.admin, but its stubs do not re-export it
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic  # type: ignore[attr-defined]

from domain import registry
from streaming.clientlog import CLIENT_LOG

log = logging.getLogger(__name__)

ClientConfig = dict[str, Any]
"""A confluent-kafka client config: librdkafka settings, plus callbacks such as
``error_cb`` or a ``logger``."""

DEAD_LETTER_PARTITIONS: Final = 1
DEAD_LETTER_SUFFIX: Final = ".dlq"

_DAY_MS: Final = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSettings:
    """A topic's partitions, retention, compression and cleanup policy."""

    partitions: int
    retention_ms: int
    compression: str = "lz4"
    cleanup_policy: str = "delete"


#: Every event topic, by the name the families use for it: seed 001's four with its
#: settings, and ``workload`` (jobs, task blocks, workflows) with system_events' own.
TOPIC_SETTINGS: Final[Mapping[str, TopicSettings]] = {
    "workload": TopicSettings(6, 7 * _DAY_MS),
    "system_events": TopicSettings(6, 7 * _DAY_MS, "lz4"),
    "performance_metrics": TopicSettings(12, 30 * _DAY_MS, "snappy", "compact"),
    "mesh_coordination": TopicSettings(8, 3 * _DAY_MS, "zstd"),
    "agent_lifecycle": TopicSettings(4, 14 * _DAY_MS, "lz4"),
}
WORKLOAD_PARTITIONS: Final = TOPIC_SETTINGS["workload"].partitions
AGENT_LIFECYCLE_PARTITIONS: Final = TOPIC_SETTINGS["agent_lifecycle"].partitions
DEAD_LETTER_RETENTION_MS: Final = max(t.retention_ms for t in TOPIC_SETTINGS.values())
"""Dead letters wait for a human, so they are kept as long as the longest topic."""

MESSAGE_TIMEOUT_MS: Final = 20_000
"""A message not acknowledged within this fails in its delivery report.

Shorter than the relay's 30 s flush, so a batch has settled (each message
delivered or failed) by the time the relay gives up on it, instead of lingering
in the producer for librdkafka's default 5 minutes and landing behind its retry.
"""

COMPRESSION: Final = "lz4"
"""Tansu stores and serves lz4 batches as they are (checked end to end)."""

_LEGAL_NAME = re.compile(r"[A-Za-z0-9._-]+")
_MAX_NAME = 249 - max(len("." + name) for name in TOPIC_SETTINGS) - len(DEAD_LETTER_SUFFIX)

# errors that mean "the broker does not like this topic config": retried without it
_CONFIG_ERRORS: Final = frozenset(
    {
        KafkaError.INVALID_CONFIG,
        KafkaError.POLICY_VIOLATION,
        KafkaError.UNSUPPORTED_VERSION,
        KafkaError.INVALID_REQUEST,
    }
)


class TopicError(RuntimeError):
    """Topics could not be listed or created.

    Attributes:
        topic: The topic concerned, or ``None`` when the broker was not reachable.
        error: The client's error, when there was one.
    """

    def __init__(self, message: str, topic: str | None = None, error: KafkaError | None = None):
        super().__init__(message)
        self.topic = topic
        self.error = error


@dataclass(frozen=True)
class TopicSpec:
    """A topic as :func:`ensure_topics` creates it.

    Attributes:
        name: The topic's name.
        partitions: Its number of partitions.
        config: Topic configs to seed it with (as strings, as Kafka wants them).
    """

    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TopicCatalogue:
    """The names of a deployment's topics, derived from one prefix.

    Args:
        prefix: The first segment of every topic name; letters, digits, ``.``,
            ``_`` and ``-`` only.

    Raises:
        ValueError: If the prefix is empty, too long or has other characters.
    """

    prefix: str = "tadpole"
    #: Partitions of every event topic; 0: each topic's own count (:data:`TOPIC_SETTINGS`).
    partitions: int = 0

    def __post_init__(self) -> None:
        if not _LEGAL_NAME.fullmatch(self.prefix) or len(self.prefix) > _MAX_NAME:
            raise ValueError(
                f"topic prefix {self.prefix!r} must be 1-{_MAX_NAME} characters "
                "of A-Z, a-z, 0-9, '.', '_' and '-'"
            )

    def topic(self, name: str) -> str:
        """The full name of the topic a family calls ``name`` (``workload``...)."""
        if name not in TOPIC_SETTINGS:
            raise KeyError(f"no topic {name!r}: add its settings to TOPIC_SETTINGS")
        return f"{self.prefix}.{name}"

    def topic_for(self, message_type: str) -> str:
        """The topic an event of ``message_type`` goes to, as its family declares.

        A type no family stores (an unreadable event's placeholder) goes to the
        first family's topic, whose dead letters then hold it.
        """
        name = registry.TOPIC_OF_EVENT.get(message_type, registry.TOPICS[0])
        return self.topic(name)

    @property
    def workload(self) -> str:
        """Job, task and workflow events, keyed by aggregate id (6 partitions unless set)."""
        return self.topic("workload")

    @property
    def agent_lifecycle(self) -> str:
        """Spot (agent) events, keyed by aggregate id (4 partitions unless set)."""
        return self.topic("agent_lifecycle")

    @property
    def event_topics(self) -> tuple[str, ...]:
        """Every topic the families' events go to: the projectors subscribe to them all."""
        return tuple(self.topic(name) for name in registry.TOPICS)

    def dead_letter(self, topic: str) -> str:
        """The dead-letter topic of ``topic`` (1 partition).

        Args:
            topic: A topic of this catalogue, e.g. :attr:`workload`.

        Returns:
            ``f"{topic}.dlq"``.
        """
        return f"{topic}{DEAD_LETTER_SUFFIX}"

    @property
    def all_topics(self) -> tuple[str, ...]:
        """Every topic of the catalogue: the event topics, then their dead letters."""
        return tuple(spec.name for spec in self.specs())

    def specs(self) -> tuple[TopicSpec, ...]:
        """Every topic of the catalogue with its partitions and seed configs."""

        events = [
            TopicSpec(
                self.topic(name),
                self.partitions or TOPIC_SETTINGS[name].partitions,
                _config(TOPIC_SETTINGS[name]),
            )
            for name in registry.TOPICS
        ]
        dead_letter = _config(TopicSettings(DEAD_LETTER_PARTITIONS, DEAD_LETTER_RETENTION_MS))
        letters = [
            TopicSpec(self.dead_letter(spec.name), DEAD_LETTER_PARTITIONS, dead_letter)
            for spec in events
        ]
        return (*events, *letters)


def _config(settings: TopicSettings) -> dict[str, str]:
    return {
        "retention.ms": str(settings.retention_ms),
        "cleanup.policy": settings.cleanup_policy,
        "compression.type": settings.compression,
    }


def ensure_topics(bootstrap_servers: str, catalogue: TopicCatalogue, timeout: float = 10.0) -> None:
    """Create every topic of ``catalogue`` that the broker does not have.

    Idempotent and safe to race with other processes doing the same: a topic
    that exists already (``TOPIC_ALREADY_EXISTS``) is fine. Topics are created
    with the catalogue's partition counts, the broker's default replication
    factor and the seed configs; if the broker rejects the configs the topic is
    created without them (and a warning logged). A topic that exists with other
    partition counts is left alone with a warning (keys still keep their order).
    Returns once the broker's metadata shows every topic with all its partitions.

    Args:
        bootstrap_servers: The brokers, ``host:port[,host:port...]``.
        catalogue: The topics to ensure.
        timeout: Seconds for the whole operation.

    Raises:
        TopicError: If the broker cannot be reached, refuses to create a topic,
            or the topics do not show up within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    admin = AdminClient(
        admin_config(
            bootstrap_servers,
            **{"socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000))},
        )
    )
    specs = {spec.name: spec for spec in catalogue.specs()}
    metadata = _metadata(admin, deadline, bootstrap_servers)
    present = {
        name: len(metadata.topics[name].partitions)
        for name in specs
        if name in metadata.topics and metadata.topics[name].error is None
    }
    for name, count in present.items():
        if count != specs[name].partitions:
            log.warning(
                "topic %s has %d partitions, not %d; leaving it as it is",
                name,
                count,
                specs[name].partitions,
            )
    missing = [spec for name, spec in specs.items() if name not in present]
    if not missing:
        return
    rejected = _create(admin, missing, deadline, with_config=True)
    if rejected:
        log.warning(
            "the broker rejected the seed configs of %s; creating them without",
            ", ".join(spec.name for spec in rejected),
        )
        _create(admin, rejected, deadline, with_config=False)
    _await_topics(admin, missing, deadline, bootstrap_servers)
    log.info("created topics %s", ", ".join(spec.name for spec in missing))


def _remaining(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.1)


def _metadata(admin: AdminClient, deadline: float, bootstrap_servers: str) -> ClusterMetadata:
    try:
        return admin.list_topics(timeout=_remaining(deadline))
    except KafkaException as failure:
        error = failure.args[0] if failure.args else None
        raise TopicError(
            f"cannot list the topics of {bootstrap_servers}: {failure}",
            error=error if isinstance(error, KafkaError) else None,
        ) from None


def _create(
    admin: AdminClient, specs: list[TopicSpec], deadline: float, *, with_config: bool
) -> list[TopicSpec]:
    """Create ``specs``; return those whose configs were rejected (if ``with_config``)."""
    new_topics = [
        NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=-1,  # the broker's default
            config=dict(spec.config) if with_config else {},
        )
        for spec in specs
    ]
    timeout = _remaining(deadline)
    futures = admin.create_topics(new_topics, operation_timeout=timeout, request_timeout=timeout)
    rejected: list[TopicSpec] = []
    for spec in specs:
        try:
            futures[spec.name].result(timeout=_remaining(deadline))
        except KafkaException as failure:
            error = failure.args[0] if failure.args else None
            if not isinstance(error, KafkaError):
                raise TopicError(f"cannot create topic {spec.name}: {failure}", spec.name) from None
            if error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue  # someone else was quicker
            if with_config and spec.config and error.code() in _CONFIG_ERRORS:
                rejected.append(spec)
                continue
            raise TopicError(
                f"cannot create topic {spec.name}: {error.name()}: {error.str()}", spec.name, error
            ) from None
        except TimeoutError:
            raise TopicError(f"creating topic {spec.name} timed out", spec.name) from None
    return rejected


def _await_topics(
    admin: AdminClient, specs: list[TopicSpec], deadline: float, bootstrap_servers: str
) -> None:
    """Wait until the metadata shows every topic of ``specs`` with all partitions led."""
    pause = 0.01
    while True:
        metadata = _metadata(admin, deadline, bootstrap_servers)
        waiting = [
            spec.name
            for spec in specs
            if spec.name not in metadata.topics
            or metadata.topics[spec.name].error is not None
            or not metadata.topics[spec.name].partitions
            or any(p.leader < 0 for p in metadata.topics[spec.name].partitions.values())
        ]
        if not waiting:
            return
        if time.monotonic() >= deadline:
            raise TopicError(
                f"topics {', '.join(waiting)} were created on {bootstrap_servers} "
                "but do not show up in its metadata",
                waiting[0],
            )
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


RECONNECT_BACKOFF_MS: Final = 250
"""The pause before a client connects to a broker again after a failed attempt.

librdkafka's consumer does not grow it while the broker is down (measured:
one attempt per ``reconnect.backoff.ms`` for each broker it knows, the
bootstrap address counting as one), so it is what sets the rate of refused
connections: 50 ms made ~40 a second per consumer. 250 ms still notices a
restarted broker within a third of a second; the log lines are throttled on
top of that (:mod:`streaming.clientlog`).
"""


def client_config(bootstrap_servers: str, **overrides: object) -> ClientConfig:
    """What every Kafka client of Tadpole shares: producers, consumers, admin clients.

    * no topic auto-creation: only :func:`ensure_topics` creates topics;
    * reconnects after :data:`RECONNECT_BACKOFF_MS`, at most 2 s apart;
    * librdkafka's log lines go to Python logging (:data:`streaming.clientlog.CLIENT_LOG`,
      logger ``streaming.librdkafka``) instead of stderr, with repeats throttled to one
      per kind per client every few seconds.

    Args:
        bootstrap_servers: The brokers, ``host:port[,host:port...]``.
        **overrides: Settings that replace or add to these, as for :func:`producer_config`.

    Returns:
        A config dict for any confluent-kafka client.
    """
    config: ClientConfig = {
        "bootstrap.servers": bootstrap_servers,
        "allow.auto.create.topics": False,
        "reconnect.backoff.ms": RECONNECT_BACKOFF_MS,
        "reconnect.backoff.max.ms": 2000,
        "logger": CLIENT_LOG,
    }
    config.update(overrides)
    return config


def admin_config(bootstrap_servers: str, **overrides: object) -> ClientConfig:
    """Settings for an :class:`~confluent_kafka.admin.AdminClient` (:func:`client_config`)."""
    return client_config(bootstrap_servers, **overrides)


def producer_config(bootstrap_servers: str, **overrides: object) -> ClientConfig:
    """Settings for the idempotent producer (the relay).

    Idempotence (``acks=all``, retries without duplicates or reordering within a
    partition); ``linger.ms`` 5 batches what is produced together, and costs no
    latency to whoever calls ``flush()``, which sends at once; lz4 batches; no
    topic auto-creation; quick reconnects to a broker that restarts; a message
    fails after :data:`MESSAGE_TIMEOUT_MS` instead of librdkafka's 5 minutes;
    and what every client shares (:func:`client_config`).

    An idempotent producer does not survive a broker that restarts empty: it is
    never told (no fatal error), each message just times out (``_MSG_TIMED_OUT``)
    and it must be purged and replaced; see ``tests/integration/test_broker.py``.
    A producer for which order does not matter (dead letters) is better off
    without idempotence, ``**{"enable.idempotence": False}``: it then has no
    producer id to go stale.

    Args:
        bootstrap_servers: The brokers, ``host:port[,host:port...]``.
        **overrides: Settings that replace or add to these: callbacks
            (``error_cb=...``, ``logger=...``) or librdkafka properties, whose
            dotted names go through a dict: ``**{"client.id": "relay"}``.

    Returns:
        A config dict for :class:`confluent_kafka.Producer`.
    """
    return client_config(
        bootstrap_servers,
        **{
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": COMPRESSION,
            "message.timeout.ms": MESSAGE_TIMEOUT_MS,
            **overrides,
        },
    )


def consumer_config(bootstrap_servers: str, group_id: str, **overrides: object) -> ClientConfig:
    """Settings for a consumer in a group, tuned for low lag, committing by hand.

    * ``enable.auto.commit`` false: commit after the read model applied a batch;
      offsets are still *stored* on delivery, so ``commit()`` without arguments
      commits what was consumed;
    * ``auto.offset.reset`` earliest: a new group, or one whose offsets the
      broker lost, starts from the beginning;
    * ``session.timeout.ms`` 6000 / ``heartbeat.interval.ms`` 1000: Tansu holds a
      group's first join for about half the session timeout (3 s here, 23 s at
      librdkafka's default 45 s);
    * ``fetch.wait.max.ms`` 10 / ``fetch.min.bytes`` 1: Tansu answers an empty
      fetch only after the full wait, so this bounds the added latency (measured
      produce → consume: p50 7 ms, p99 10-30 ms) at the cost of 100 fetches a
      second per idle consumer;
    * ``partition.assignment.strategy`` range (eager): Tansu 0.6.0 mishandles
      cooperative-sticky; when a second member joins, the partitions the first
      one gives up are assigned to nobody and stay unconsumed. With range every
      rebalance pauses the group for about 3 s, and nothing is lost;
    * quick retries, reconnects (:func:`client_config`) and metadata refreshes,
      so a broker that restarted empty is noticed within a second and the group
      rejoined in about 3 s once the topics exist again.

    Args:
        bootstrap_servers: The brokers, ``host:port[,host:port...]``.
        group_id: The consumer group.
        **overrides: Settings that replace or add to these, as for
            :func:`producer_config`.

    Returns:
        A config dict for :class:`confluent_kafka.Consumer`.
    """
    return client_config(
        bootstrap_servers,
        **{
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 20,
            "fetch.min.bytes": 1,
            "fetch.error.backoff.ms": 50,
            "fetch.queue.backoff.ms": 10,
            "partition.assignment.strategy": "range",
            "topic.metadata.refresh.interval.ms": 5000,
            **overrides,
        },
    )
