"""`tadpole up` keeps its embedded broker alive: killed, it comes back and the pipeline works."""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.codec import Codec
from streaming.topics import TopicCatalogue
from tests.e2e.conftest import Stack, http, wait_for
from tests.e2e.fleet import sweep
from tests.e2e.test_stack import _converges, _store

pytestmark = pytest.mark.e2e

DOWN_FOR = 10.0
"""Seconds the broker is kept dead to measure the log lines the stack writes meanwhile."""

# through Python logging "[rdkafka#consumer-2] ...", or librdkafka's own "|rdkafka#consumer-2| ..."
REFUSED = re.compile(r"(rdkafka#[\w-]+)\W.* Connect to \S+ failed: Connection refused")


def _broker_port(pid: int) -> int:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return int(args[args.index("--listener-url") + 1].rsplit(":", 1)[1])


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed child stays one until its parent reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _read_topics(bootstrap: str, topics: TopicCatalogue) -> dict[TopicPartition, list[int]]:
    """Every event's store position in the event topics, by partition, read to the end."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"e2e-reader-{uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    codec = Codec()
    counts = {s.name: s.partitions for s in topics.specs() if s.name in topics.event_topics}
    partitions = [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
    found: dict[TopicPartition, list[int]] = {
        TopicPartition(t.topic, t.partition): [] for t in partitions
    }
    try:
        reader.assign([TopicPartition(t.topic, t.partition, OFFSET_BEGINNING) for t in partitions])
        ended: set[tuple[str, int]] = set()
        deadline = time.monotonic() + 20
        while len(ended) < len(partitions):
            assert time.monotonic() < deadline, f"read only {ended} to their end"
            message = reader.poll(0.1)
            if message is None:
                continue
            error = message.error()
            where = (message.topic() or "", message.partition() or 0)
            if error is None:
                found[TopicPartition(*where)].append(codec.decode(message.value() or b"").position)
            elif error.code() == KafkaError._PARTITION_EOF:
                ended.add(where)
            else:
                raise AssertionError(f"reading {where}: {error}")
    finally:
        reader.close()
    return found


def _committed(bootstrap: str, group: str, partitions: list[TopicPartition]) -> list[int]:
    lookup = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        return [tp.offset for tp in lookup.committed(partitions, timeout=10)]
    finally:
        lookup.close()


def _job(stack: Stack, job_id: str) -> Any:
    status, job = http("GET", f"{stack.base}/api/v1/jobs/{job_id}")
    return job if status == 200 else None


def test_a_killed_broker_comes_back_on_its_port_and_commands_flow_again(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start()
    assert stack.process is not None
    broker = stack.children()["broker"]
    port = _broker_port(broker)
    bootstrap = f"127.0.0.1:{port}"
    topics = TopicCatalogue(stack.extra["name"], partitions=1)  # `tadpole up`, embedded broker
    store = _store(stack)
    try:
        # The supervisor is paused while the broker is dead, to keep it dead for a
        # while: meanwhile the relay and the projectors run on, and log.
        os.kill(stack.process.pid, signal.SIGSTOP)
        try:
            os.kill(broker, signal.SIGKILL)
            wait_for(lambda: not _alive(broker), 10, "the broker to die")
            killed, logged = time.monotonic(), stack.log.stat().st_size
            before = store.max_position()
            # A command while the broker is down is stored; the relay cannot send it.
            status, created = http("POST", stack.base + "/api/v1/jobs", sweep(1))
            assert status == 201
            job_id = created["jobId"]
            # Health says so while it is down.
            status, health = http("GET", stack.base + "/api/v1/health")
            assert (status, health["status"], health["broker"]) == (200, "degraded", "down")
            assert "the broker is down" in health["problems"]
            wait_for(
                lambda: (
                    time.monotonic() - killed >= DOWN_FOR
                    and stack.log.read_text().count("relay: broker trouble") >= 2
                ),
                DOWN_FOR + 30,
                "the broker to be down long enough, the relay failing to send",
            )
            down = stack.log.read_bytes()[logged:].decode(errors="replace").splitlines()
            seconds = time.monotonic() - killed
        finally:
            os.kill(stack.process.pid, signal.SIGCONT)

        # Back on the same port (its children were given that address).
        wait_for(lambda: stack.children().get("broker") not in (None, broker), 30, "a new broker")
        assert _broker_port(stack.children()["broker"]) == port

        # Before: each consumer logged a refused connection every 25 ms, the whole
        # stack ~76 lines a second. Now one per kind and client every 5 s.
        refused = Counter(m.group(1) for m in map(REFUSED.search, down) if m)
        # the two projectors' consumers have the same name: one name, two clients
        assert refused and max(refused.values()) <= 2 * (seconds / 5 + 1), refused
        assert len(down) / seconds < 3.0, "\n".join(down)

        wait_for(
            lambda: http("GET", stack.base + "/api/v1/health")[1]["broker"] == "connected",
            30,
            "health to see the broker back",
        )

        # New commands go through Kafka to both read models.
        spot = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.9"})[1]
        claim = http(
            "POST",
            stack.base + "/internal/v1/tasks/claim",
            {"spotId": spot["spotId"], "maxTasks": 1},
        )
        assert claim[0] == 200 and len(claim[1]["tasks"]) == 1, claim
        task = claim[1]["tasks"][0]
        done = http(
            "POST",
            f"{stack.base}/internal/v1/tasks/{task['id']}/complete",
            {
                "spotId": spot["spotId"],
                "fopt": 0.25,
                "runtimeMs": 3,
                "fenceToken": task["fenceToken"],
            },
        )
        assert done[0] == 200, done
        job = wait_for(
            lambda: (lambda j: j if j and j["completedTasks"] == 1 else None)(_job(stack, job_id)),
            30,
            "the completion in the Redis read model",
        )
        assert job["totalTasks"] == 1 and job["status"] == "DONE"
        results = wait_for(
            lambda: (lambda r: r[1] if r[0] == 200 and r[1]["totalCompleted"] else None)(
                http("GET", f"{stack.base}/api/v1/jobs/{job_id}/results")
            ),
            30,
            "the completion in the PostgreSQL read model",
        )
        assert [(r["taskId"], r["fopt"]) for r in results["results"]] == [(task["id"], 0.25)]

        # Everything stored since the kill is in the new broker's topics...
        after = set(range(before + 1, store.max_position() + 1))
        found = wait_for(
            lambda: (lambda f: f if after <= {p for ps in f.values() for p in ps} else None)(
                _read_topics(bootstrap, topics)
            ),
            30,
            "every event since the kill in Kafka",
        )
        # ...and both projectors consumed it from there (their group offsets are new).
        filled = [tp for tp, positions in found.items() if positions]
        ends = [len(found[tp]) for tp in filled]
        for which in ("postgres", "redis"):
            group = f"{topics.prefix}.projector.{which}"
            wait_for(
                lambda group=group: _committed(bootstrap, group, filled) == ends,
                30,
                f"{group} to commit everything in the new broker",
            )
    finally:
        store.close()
    # Nothing lost, nothing applied twice: the live read models equal a rebuild.

    _converges(stack, stack.extra["name"] + "b", timeout=30)
