"""Fixtures for the integration tests: the embedded broker and fresh topics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from uuid import uuid4

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from streaming.broker import EmbeddedBroker
from streaming.topics import TopicCatalogue, ensure_topics


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded Tansu broker (memory-only) for the whole test session."""
    embedded = EmbeddedBroker()
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def topics(broker: EmbeddedBroker) -> Iterator[TopicCatalogue]:
    """A catalogue with a prefix of its own, its topics created on ``broker``.

    The topics are deleted afterwards (best effort) so that a long session does
    not pile them up in the broker's memory.
    """
    catalogue = TopicCatalogue(f"t{uuid4().hex[:10]}")
    ensure_topics(broker.bootstrap_servers, catalogue)
    yield catalogue
    if broker.running:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
        for future in admin.delete_topics(list(catalogue.all_topics)).values():
            with contextlib.suppress(KafkaException, TimeoutError):
                future.result(timeout=5)
