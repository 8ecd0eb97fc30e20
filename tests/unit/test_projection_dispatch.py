"""Projection dispatch: each read model handles the event types it names, and only those."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest

from domain.ids import job_id
from projections.dispatch import Unhandled
from projections.postgres import tables
from projections.postgres.tables import PostgresReadModel
from projections.redis import dashboards
from projections.redis.dashboards import RedisKeys, RedisReadModel, ops_for
from schemas.codec import EventMessage
from schemas.events import EVENT_CLASSES, event_type

MODELS = [PostgresReadModel, RedisReadModel]
NOW = datetime(2026, 1, 28, 16, 0, tzinfo=UTC)


def message(kind: str, **data: Any) -> EventMessage:
    return EventMessage(kind, uuid4(), 2, 10, NOW, data)


def failure_like(kind: str) -> EventMessage:
    """An event shaped like ``TaskBlock.Failed``, of type ``kind``."""
    return message(
        kind,
        job_id=job_id(uuid4()),
        indexes=[0, 1],
        retried=[False, False],
        errors=["x", "y"],
        at=NOW,
    )


@pytest.mark.parametrize("model", MODELS)
def test_a_model_names_the_types_it_handles_and_those_it_leaves_out(model: type) -> None:
    handlers = tables.HANDLERS if model is PostgresReadModel else dashboards.HANDLERS
    assert frozenset(handlers) == model.HANDLED
    assert not model.HANDLED & model.NOT_SHOWN


@pytest.mark.parametrize("model", MODELS)
def test_every_stored_event_type_is_handled_or_left_out_on_purpose(model: type) -> None:
    types = {event_type(cls) for cls in EVENT_CLASSES}
    assert types <= model.HANDLED | model.NOT_SHOWN, types - model.HANDLED - model.NOT_SHOWN
    assert types >= model.HANDLED | model.NOT_SHOWN, "a handler for an event no one stores"


def test_the_redis_model_does_not_count_an_unknown_block_event_as_a_failure() -> None:
    keys = RedisKeys("p")
    assert ops_for(keys, failure_like("TaskBlock.Split")) is None
    failed = ops_for(keys, failure_like("TaskBlock.Failed"))
    assert failed is not None and ("HINCRBY", "p:counts", "FAILED", 2) in failed


def test_the_postgres_model_changes_nothing_for_an_unknown_event() -> None:
    def no_sweep(job: object) -> Any:
        raise AssertionError("an unknown event must not read a sweep")

    changes = tables._Changes(no_sweep)
    assert changes.add(failure_like("TaskBlock.Split")) is False
    assert (changes.tasks, changes.job_counts, changes.jobs) == ({}, {}, [])
    assert changes.add(failure_like("TaskBlock.Failed")) is True
    assert changes.job_counts


def test_an_unhandled_type_is_logged_once_and_one_left_out_never(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unhandled = Unhandled("test", frozenset({"Spot.Renamed"}))
    with caplog.at_level(logging.WARNING, logger="projections.dispatch"):
        for kind in ("TaskBlock.Split", "TaskBlock.Split", "Spot.Renamed", "Job.Paused"):
            unhandled.note(kind)
    assert [r.getMessage() for r in caplog.records] == [
        "the test read model has no handler for TaskBlock.Split events: they are ignored",
        "the test read model has no handler for Job.Paused events: they are ignored",
    ]
