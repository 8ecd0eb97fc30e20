"""Every value the API accepts fits the PostgreSQL read model: 64-bit figures land as given.

The real store and the real PostgreSQL read model, fed straight from the store (no
broker needed for what this shows): a heartbeat, a sweep and a completion carrying the
64-bit bounds the API's validation lets through (a sweep's, 32-bit).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from domain.jobs import CompleteTask, CreateJob
from domain.jobs.sweeps import VALUE_MAX, VALUE_MIN, Range, Sweep
from domain.processor import CommandProcessor
from domain.spots import Claimed, ClaimTasks, Heartbeat, Hello, SpotRegistered
from eventstore.store import StorePort, TadpoleStore
from projections.postgres.tables import PostgresReadModel
from service.settings import Settings
from service.wiring import open_store
from streaming.consumer import StoreReader

pytestmark = pytest.mark.integration

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@pytest.fixture
def parts() -> Iterator[tuple[TadpoleStore, PostgresReadModel, Settings]]:
    name = f"it_wide_{uuid4().hex[:10]}"
    settings = Settings().with_changes(store_schema=f"{name}_store", read_schema=f"{name}_read")
    store = open_store(settings)
    model = PostgresReadModel(
        settings.database_url, settings.read_schema, StoreReader(store).first_event
    )
    model.create()
    try:
        yield store, model, settings
    finally:
        model.close()
        store.close()
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            for schema in (settings.store_schema, settings.read_schema):
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
                )


def _project(store: TadpoleStore, model: PostgresReadModel) -> None:
    reader, position = StoreReader(store), 0
    while True:
        last, page = reader.after(position)
        if last == position:
            return
        assert model.apply(page) == []
        position = last


def test_64_bit_figures_reach_the_read_model_as_given(
    parts: tuple[TadpoleStore, PostgresReadModel, Settings],
) -> None:
    store, model, settings = parts
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    now = datetime.now(UTC)
    (hello,) = processor.process([Hello("10.0.0.1")], now)
    assert isinstance(hello, SpotRegistered)
    spot = hello.spot_id
    # A sweep's numbers stop at 32 bits (a spot reads them as Java ints: domain/sweeps.py)
    sweep = Sweep(
        "/j.jar", "M", ("PSO",), Range(VALUE_MAX, VALUE_MAX, 1), Range(VALUE_MIN, VALUE_MIN, 1),
        Range(VALUE_MAX, VALUE_MAX, VALUE_MAX),
    )  # fmt: skip
    processor.process(
        [
            Heartbeat(spot, cpu_load=1.5e308, running_tasks=INT64_MAX, total_cores=INT64_MAX),
            CreateJob(sweep),
        ],
        now,
    )
    (claimed,) = processor.process([ClaimTasks(spot, 1)], now)
    assert isinstance(claimed, Claimed)
    (task,) = claimed.tasks
    processor.process(
        [CompleteTask(task.task_id, spot, task.fence, INT64_MAX, INT64_MIN, -1e308, "{}")], now
    )

    _project(store, model)

    with psycopg.connect(settings.database_url) as conn:
        schema = sql.Identifier(settings.read_schema)
        spots = conn.execute(
            sql.SQL("SELECT running_tasks, total_cores, cpu_load FROM {}.spots").format(schema)
        ).fetchall()
        tasks = conn.execute(
            sql.SQL("SELECT iterations, agents, dimension, runtime_ms, iter FROM {}.tasks").format(
                schema
            )
        ).fetchall()
    assert spots == [(INT64_MAX, INT64_MAX, 1.5e308)]
    assert tasks == [(VALUE_MAX, VALUE_MIN, VALUE_MAX, INT64_MAX, INT64_MIN)]
