"""The throttle on librdkafka's log lines, and the bootstrap address parsing."""

from __future__ import annotations

import logging

from streaming.broker import bootstrap_addresses
from streaming.clientlog import CLIENT_LOG, Throttle
from streaming.topics import admin_config, consumer_config, producer_config

REFUSED = (
    "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to "
    "ipv4#127.0.0.1:9092 failed: Connection refused (after {ms}ms in state CONNECT)"
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def line(
    text: str, client: str = "rdkafka#consumer-1", level: int = logging.ERROR
) -> logging.LogRecord:
    """A record as confluent-kafka makes it: ``"%s [%s] %s"`` (facility, client, text)."""
    return logging.LogRecord(
        "streaming.librdkafka", level, __file__, 1, "%s [%s] %s", ("FAIL", client, text), None
    )


def test_a_repeated_line_passes_once_per_interval_then_says_how_many_were_held() -> None:
    clock = Clock()
    throttle = Throttle(interval=5.0, clock=clock)
    passed = []
    for tick in range(100):  # 40 a second for 2.5 s, as librdkafka did with the broker down
        clock.now = 100.0 + tick * 0.025
        record = line(REFUSED.format(ms=tick % 3))
        if throttle.filter(record):
            passed.append(record.getMessage())
    assert len(passed) == 1 and "more like it" not in passed[0]

    clock.now = 105.0
    record = line(REFUSED.format(ms=0))
    assert throttle.filter(record)
    assert record.getMessage().endswith("(99 more like it in the last 5s)")
    clock.now = 109.9
    assert not throttle.filter(line(REFUSED.format(ms=0)))


def test_other_brokers_threads_and_numbers_are_the_same_kind() -> None:
    throttle = Throttle(interval=5.0, clock=Clock())
    assert throttle.filter(line(REFUSED.format(ms=0)))
    coordinator = (
        "[thrd:GroupCoordinator]: GroupCoordinator: 127.0.0.1:9092: Connect to "
        "ipv4#127.0.0.1:9092 failed: Connection refused (after 3ms in state CONNECT)"
    )
    known = REFUSED.format(ms=1).replace("bootstrap", "111")
    assert not throttle.filter(line(coordinator))
    assert not throttle.filter(line(known))


def test_other_messages_clients_and_levels_still_show_at_once() -> None:
    throttle = Throttle(interval=5.0, clock=Clock())
    assert throttle.filter(line(REFUSED.format(ms=0)))
    assert throttle.filter(line(REFUSED.format(ms=0), client="rdkafka#producer-1"))
    assert throttle.filter(line(REFUSED.format(ms=0), level=logging.INFO))
    closed = "[thrd:main]: 127.0.0.1:9092/111: Disconnected: connection closed by peer"
    assert throttle.filter(line(closed))
    plain = logging.LogRecord("x", logging.WARNING, __file__, 1, "not from librdkafka", None, None)
    assert throttle.filter(plain)
    assert not throttle.filter(plain)


def test_every_client_config_logs_through_the_throttled_logger() -> None:
    assert any(isinstance(f, Throttle) for f in CLIENT_LOG.filters)
    for config in (
        producer_config("b:1"),
        consumer_config("b:1", "g"),
        admin_config("b:1"),
    ):
        assert config["logger"] is CLIENT_LOG
        assert config["allow.auto.create.topics"] is False
        assert config["reconnect.backoff.ms"] >= 250


def test_bootstrap_addresses_parse_hosts_ports_schemes_and_v6() -> None:
    assert bootstrap_addresses("127.0.0.1:9092") == [("127.0.0.1", 9092)]
    assert bootstrap_addresses(" kafka:9092 , PLAINTEXT://other:19092,[::1]:9093") == [
        ("kafka", 9092),
        ("other", 19092),
        ("::1", 9093),
    ]
    assert bootstrap_addresses("nohost,:9092,host:,host:x,host:70000") == []
