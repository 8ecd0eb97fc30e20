"""Events the API would refuse, injected past it: dead-lettered while the pipeline goes on.

The edge refuses such values (tests/unit/test_api.py); these tests store them
through the writer directly, as a bug or an older version might have, and show
that the relay and the projectors dead-letter exactly those events, apply every
other one, and re-apply the dead letters once the cause is fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from psycopg import sql

from domain.ids import parse_spot_id
from domain.spots import Heartbeat, Hello, SpotRegistered
from projections.postgres.tables import PostgresReadModel
from service.deadletters import retry_letters
from streaming.broker import EmbeddedBroker
from streaming.consumer import StoreReader
from streaming.deadletters import RELAY, DeadLetters, projector_stage
from streaming.relay import RelayPosition
from streaming.topics import TopicCatalogue
from tests.integration.support import TcpProxy, relay_all, running, wait_for
from tests.integration.test_projections import Env, environment

pytestmark = pytest.mark.integration


@pytest.fixture
def env(broker: EmbeddedBroker, topics: TopicCatalogue) -> Iterator[Env]:
    with environment(broker, topics) as made:
        yield made


TOO_LARGE = "x" * 1_200_000  # over the producer's 1,000,000-byte message size
BEYOND_LONG = 2**63  # no Avro long, no PostgreSQL bigint


def spot(env: Env, ip: str) -> str:
    (result,) = env.writer.run([Hello(ip)])
    assert isinstance(result, SpotRegistered)
    return result.spot_id


def spots_table(env: Env, schema: str | None = None) -> dict[str, dict[str, Any]]:
    with psycopg.connect(env.settings.database_url) as conn:
        rows = conn.execute(
            sql.SQL("SELECT id, ip_address, total_cores FROM {}.spots").format(
                sql.Identifier(schema or env.settings.read_schema)
            )
        ).fetchall()
    return {r[0]: {"ip": r[1], "cores": r[2]} for r in rows}


def test_relay_dead_letters_what_it_cannot_encode_or_produce_and_goes_on(env: Env) -> None:
    good = spot(env, "10.0.0.1")
    big = spot(env, TOO_LARGE)
    huge = spot(env, "10.0.0.3")
    env.writer.run([Heartbeat(huge, running_tasks=BEYOND_LONG)])
    env.writer.run([Heartbeat(good, cpu_load=0.5)])
    last = env.messages()[-1].position

    relay = env.relay()
    assert relay_all(relay) == last  # the relay went past both and recorded its position
    letters = DeadLetters(env.store).unresolved(RELAY)
    by_aggregate = {(d.aggregate_id, d.version): d for d in letters}
    assert set(by_aggregate) == {(parse_spot_id(big), 1), (parse_spot_id(huge), 2)}
    assert "refused" in by_aggregate[parse_spot_id(big), 1].error
    assert "Avro" in by_aggregate[parse_spot_id(huge), 2].error
    assert DeadLetters(env.store).counts() == {RELAY: 2}

    # everything else reached Kafka: a projector fed by Kafka alone has the good spot's beat
    model = env.postgres()
    projector = env.projector(model, reconcile_interval=3600.0)
    model.create()
    with running(projector):
        wait_for(
            lambda: (
                spots_table(env).get(good, {}).get("ip") == "10.0.0.1"
                and env.applied(parse_spot_id(good))[0] == 2
            ),
            30,
            "the good spot's heartbeat through Kafka",
        )

    # A retry while the cause stands is taken, and fails again: still one letter each.
    assert DeadLetters(env.store).request_retry(stage=RELAY) == 2
    relay._retry_at = 0.0
    relay._retry_due()
    again = DeadLetters(env.store).unresolved(RELAY)
    assert sorted(d.attempts for d in again) == [2, 2]
    assert {d.state for d in again} == {"open"}


def test_projector_dead_letters_what_its_model_refuses_parks_that_aggregate_and_re_applies_it(
    env: Env,
) -> None:
    model = env.postgres()
    model.create()
    # An older, narrower column: a value the edge accepts does not fit it.
    with psycopg.connect(env.settings.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE {}.spots ALTER COLUMN total_cores TYPE smallint").format(
                sql.Identifier(env.settings.read_schema)
            )
        )
    a, b, nul = spot(env, "10.0.0.1"), spot(env, "10.0.0.2"), spot(env, "10.0.\x00.3")
    env.writer.run([Heartbeat(a, total_cores=8), Heartbeat(b, total_cores=40_000)])
    env.writer.run([Heartbeat(b, total_cores=16)])  # after its poison: held back, in order
    env.writer.run([Heartbeat(a, total_cores=12)])  # another aggregate: goes on

    stage = projector_stage("postgres")
    projector = env.projector(model)
    assert projector.catch_up() == env.messages()[-1].position
    letters = {(d.aggregate_id, d.version): d for d in DeadLetters(env.store).unresolved(stage)}
    assert set(letters) == {(parse_spot_id(b), 2), (parse_spot_id(nul), 1)}
    assert "smallint" in letters[parse_spot_id(b), 2].error
    assert "NUL" in letters[parse_spot_id(nul), 1].error
    table = spots_table(env)
    assert table[a] == {"ip": "10.0.0.1", "cores": 12}  # applied, all of it
    assert table[b] == {"ip": "10.0.0.2", "cores": 0}  # parked at version 1
    assert nul not in table
    assert env.applied(parse_spot_id(b))[0] == 1

    # The fix: the column widened. A retry re-applies b's events in order, once.
    with psycopg.connect(env.settings.database_url, autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER TABLE {}.spots ALTER COLUMN total_cores TYPE bigint").format(
                sql.Identifier(env.settings.read_schema)
            )
        )
    assert DeadLetters(env.store).request_retry(stage=stage) == 2
    projector.retry_dead_letters()
    assert spots_table(env)[b] == {"ip": "10.0.0.2", "cores": 16}
    assert env.applied(parse_spot_id(b))[0] == 3
    (still,) = DeadLetters(env.store).unresolved(stage)  # a NUL no column takes
    assert (still.aggregate_id, still.state, still.attempts) == (parse_spot_id(nul), "open", 2)
    rebuilt, _ = env.rebuilt()  # a rebuild holds back the same aggregate
    assert model.dump() == rebuilt


def test_projector_fed_by_kafka_dead_letters_and_carries_on(env: Env) -> None:
    model = env.postgres()
    model.create()
    relay = env.relay()
    projector = env.projector(model)
    with running(relay, projector):
        a = spot(env, "10.0.0.1")
        bad = spot(env, "\x00")
        b = spot(env, "10.0.0.2")
        wait_for(lambda: {a, b} <= set(spots_table(env)), 30, "the good spots through Kafka")
        wait_for(
            lambda: DeadLetters(env.store).counts() == {projector_stage("postgres"): 1},
            30,
            "the dead letter",
        )
        env.writer.run([Heartbeat(b, total_cores=7)])
        wait_for(lambda: spots_table(env)[b]["cores"] == 7, 30, "the next event applied")
    assert bad not in spots_table(env)


def test_tadpole_dead_letters_retry_reports_what_the_running_steps_did(env: Env) -> None:
    spot(env, "\x00")
    model = env.postgres()
    model.create()
    projector = env.projector(model, reconcile_interval=0.2)
    relay = env.relay()
    with running(relay, projector):
        wait_for(lambda: DeadLetters(env.store).counts(), 30, "the dead letter")
        # the cause stands: the running projector takes the retry and it fails again
        assert retry_letters(env.settings, None, None, wait=30) == 1
    (letter,) = DeadLetters(env.store).unresolved()
    assert letter.attempts == 2


def terminate(env: Env, pid: int) -> None:
    """Terminate one server connection, as a PostgreSQL restart would."""
    with psycopg.connect(env.settings.database_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_lost_connection_is_waited_out_not_dead_lettered(env: Env) -> None:
    model = env.postgres()
    model.create()
    relay = env.relay()
    projector = env.projector(model)
    with running(relay, projector):
        a = spot(env, "10.0.0.1")
        wait_for(lambda: a in spots_table(env), 30, "the first spot")
        # the read model's and the relay's connections cut, as by a database restart
        terminate(env, model.conn.info.backend_pid)
        terminate(env, relay.position.conn.info.backend_pid)
        b = spot(env, "10.0.0.2")
        wait_for(lambda: b in spots_table(env), 30, "the next spot, after reconnecting")
        last = env.messages()[-1].position
        recorded = RelayPosition(env.settings.database_url, env.settings.store_schema)
        try:  # (read through a connection of the test's own: the relay's is its to heal)
            wait_for(lambda: recorded.get() == last, 30, "the relay to record its position")
        finally:
            recorded.close()
    assert DeadLetters(env.store).counts() == {}


def test_a_read_model_that_is_down_is_waited_for_and_nothing_is_dead_lettered(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = TcpProxy()
    env.closing.append(proxy.close)
    model = PostgresReadModel(
        proxy.url(env.settings.database_url),
        env.settings.read_schema,
        StoreReader(env.store).first_event,
    )
    env.closing.append(model.close)
    model.create()
    relay = env.relay()
    projector = env.projector(model)
    caplog.set_level(logging.WARNING, logger="streaming.consumer")
    with running(relay, projector):
        a = spot(env, "10.0.0.1")
        wait_for(lambda: a in spots_table(env), 30, "the first spot")
        proxy.cut("refuse")  # the read model's database is gone; the store is not
        b = spot(env, "10.0.0.2")
        wait_for(
            lambda: sum("retrying in" in r.getMessage() for r in caplog.records) >= 2,
            30,
            "the projector to fail and retry",
        )
        assert b not in spots_table(env)
        proxy.restore()
        wait_for(lambda: b in spots_table(env), 30, "the spot stored during the outage")
    assert DeadLetters(env.store).counts() == {}


def test_a_reason_that_quotes_a_nul_is_still_recorded(env: Env) -> None:
    letters = DeadLetters(env.store)
    aggregate = uuid4()
    letters.record("projector.postgres", aggregate, 1, 7, "Spot.Registered", "bad '\x00' value")
    (letter,) = letters.unresolved()
    assert (letter.aggregate_id, letter.error) == (aggregate, "bad '\\0' value")


def store_unreadable(env: Env) -> tuple[Any, int]:
    """A stored event no mapper can read (its class is gone), as an old version might leave."""
    recorder: Any = env.store.recorder
    table = sql.SQL("{}.{}").format(
        sql.Identifier(recorder.datastore.schema), sql.Identifier(recorder.events_table_name)
    )
    aggregate = uuid4()
    with psycopg.connect(env.settings.database_url, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {} (originator_id, originator_version, topic, state) "
                "VALUES (%s, 1, 'gone.module:Gone.Created', '{{}}') RETURNING notification_id"
            ).format(table),
            (aggregate,),
        ).fetchone()
    assert row is not None
    return aggregate, int(row[0])


def test_an_unreadable_stored_event_is_dead_lettered_and_passed_by_every_step(env: Env) -> None:
    spot(env, "10.0.0.1")
    gone, position = store_unreadable(env)

    relay = env.relay()
    assert relay_all(relay) == position  # a batch of it alone: passed, not read again
    after = spot(env, "10.0.0.2")
    assert relay_all(relay) > position
    model = env.postgres()
    model.create()
    projector = env.projector(model)
    projector.catch_up()
    assert after in spots_table(env)  # the projector went past it too
    letters = {(d.stage, d.aggregate_id, d.version) for d in DeadLetters(env.store).unresolved()}
    assert letters == {(RELAY, gone, 1), (projector_stage("postgres"), gone, 1)}
    assert {d.attempts for d in DeadLetters(env.store).unresolved()} == {1}
