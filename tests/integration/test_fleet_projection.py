"""The fleet's read models (targets, contexts, agents, meshes, sagas) against the real
PostgreSQL and Redis, fed with events the domain makes through the command processor.

Each test has its own store schema, read schema and Redis prefix, removed afterwards.
No broker: the events are read from the store and applied as a projector applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import psycopg
import pytest
from psycopg import sql

from domain.agents import EvolveAgentCapabilities, TerminateAgent, UpdateAgentPerformance
from domain.contexts import ModifyContext
from domain.family import Result
from domain.ids import agent_id, mesh_id, saga_id, target_uuid
from domain.meshes import DissolveMesh, ImproveMeshPerformance
from domain.processor import CommandProcessor
from domain.sagas import (
    FinishCompensation,
    FinishStep,
    FireSagaTimers,
    StartMeshFormation,
    StartSpawn,
    StepFinished,
    StepTaken,
    TakeCompensation,
    TakeStep,
)
from domain.sagas.definitions import MAX_COMPENSATION_ATTEMPTS, MESH_STEPS
from domain.targets import READY, Limits, UpdateTarget
from eventstore.store import StorePort, TadpoleStore
from projections.postgres.tables import PostgresReadModel
from projections.redis.dashboards import RedisReadModel
from projections.views import PostgresViews, RedisViews
from schemas.codec import EventMessage
from service.settings import Settings
from service.wiring import open_store
from streaming.consumer import StoreReader
from tests.integration.test_projections import drop_everything, in_kafka_order

pytestmark = pytest.mark.integration

SETTINGS = Settings()
GIB = 1 << 30


class Writer:
    """The single writer on the real store, with a clock of its own."""

    def __init__(self, store: TadpoleStore):
        self.processor = CommandProcessor(StorePort(store), 3, 5.0)
        self.now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)

    def run(self, *commands: Any, advance: float = 1.0) -> list[Result]:
        self.now += timedelta(seconds=advance)
        return self.processor.process(list(commands), self.now)

    def one(self, command: Any, advance: float = 1.0) -> Any:
        (result,) = self.run(command, advance=advance)
        return result

    def step(self, saga: UUID, driver: str, **take: Any) -> StepFinished:
        """Take the next step and report it done, its built-in effect applied."""
        taken = self.one(TakeStep(saga, driver, **take))
        assert isinstance(taken, StepTaken), taken
        final = take.get("step") == MESH_STEPS[-1].name
        done = self.one(
            FinishStep(saga, taken.step, driver, taken.fence, True, apply=True, final=final)
        )
        assert isinstance(done, StepFinished), done
        return done

    def form_mesh(self, saga: UUID, mesh: UUID, min_members: int) -> None:
        self.one(StartMeshFormation(saga, mesh, "full", {"gpu": "a100"}, min_members, 3))
        after = None
        for spec in MESH_STEPS:
            done = self.step(
                saga,
                f"participant-{spec.name}",
                step=spec.name,
                after=after,
                timeout_seconds=spec.timeout_seconds,
                compensation=spec.compensation,
            )
            assert done.step_state == "SUCCEEDED", done
            after = spec.name
        assert done.saga_state == "COMPLETED"

    def spawn(self, saga: UUID, agent: UUID, mesh: UUID | None) -> None:
        self.one(StartSpawn(saga, agent, "t-1", mesh, {"gpu": "a100"}, 500, GIB))
        for _ in range(3):
            done = self.step(saga, "runner")
            assert done.step_state == "SUCCEEDED", done
        assert done.saga_state == "COMPLETED"

    def compensate(self, saga: UUID, ok: bool) -> StepFinished:
        taken = self.one(TakeCompensation(saga, "runner"), advance=11.0)  # past any retry pause
        assert isinstance(taken, StepTaken), taken
        done = self.one(
            FinishCompensation(saga, taken.step, "runner", taken.fence, ok, error="nope", apply=ok)
        )
        assert isinstance(done, StepFinished), done
        return done


@dataclass
class Fleet:
    """What :func:`scenario` made, for the checks."""

    mesh: UUID
    failed_mesh: UUID
    mesh_saga: UUID
    failed_mesh_saga: UUID
    agent: UUID
    spawn: UUID
    compensated: UUID
    compensated_agent: UUID
    aborted: UUID


def scenario(w: Writer) -> Fleet:
    """Every fleet event: targets and contexts registered and changed, a mesh formed,
    an agent spawned into it, updated and terminated, the mesh dissolved; a spawn
    compensated after a failed compensation; one aborted after a timeout; a mesh
    formation that failed before its mesh was formed."""
    f = Fleet(*(uuid4() for _ in range(9)))
    w.one(UpdateTarget("t-1", READY, {"gpu": "a100"}, Limits(4000, 8 * GIB, 2)))
    w.one(UpdateTarget("t-1", READY, {"gpu": "a100"}, Limits(2000, 4 * GIB, 3)))
    w.one(UpdateTarget("t-2", "MAINTENANCE", {}, Limits(0, 0, 0)))
    w.one(ModifyContext("ctx-1", ("org", "team"), {"k": "v"}))
    w.one(ModifyContext("ctx-1", ("org", "team", "me"), {"k": "w"}))

    w.form_mesh(f.mesh_saga, f.mesh, min_members=1)
    w.spawn(f.spawn, f.agent, f.mesh)
    w.run(UpdateAgentPerformance(f.agent, {"latency": 1.5}))
    w.run(UpdateAgentPerformance(f.agent, {"throughput": 20.0}))
    w.run(EvolveAgentCapabilities(f.agent, {"gpu": "a100", "lang": "py"}))
    w.run(ImproveMeshPerformance(f.mesh, {"latency": 0.5}))

    # A spawn whose second step fails: its reservation is given back, at the second try.
    w.one(StartSpawn(f.compensated, f.compensated_agent, "t-1", None, {}, 250, GIB))
    assert w.step(f.compensated, "runner").step_state == "SUCCEEDED"
    taken = w.one(TakeStep(f.compensated, "runner"))
    assert isinstance(taken, StepTaken)
    failed = w.one(FinishStep(f.compensated, taken.step, "runner", taken.fence, False, error="x"))
    assert failed.saga_state == "COMPENSATING"
    assert w.compensate(f.compensated, ok=False).step_state == "SUCCEEDED"
    done = w.compensate(f.compensated, ok=True)
    assert (done.step_state, done.saga_state) == ("COMPENSATED", "COMPENSATED")

    # A spawn whose first step times out, and whose compensation fails every time.
    w.one(StartSpawn(f.aborted, uuid4(), "t-1", None, {}, 100, GIB))
    taken = w.one(TakeStep(f.aborted, "runner"))
    assert isinstance(taken, StepTaken)
    assert w.one(FireSagaTimers(), advance=10.0).sagas == [saga_id(f.aborted)]
    for _ in range(MAX_COMPENSATION_ATTEMPTS):
        done = w.compensate(f.aborted, ok=False)
    assert (done.step_state, done.saga_state) == ("TIMED_OUT", "ABORTED")

    # A mesh formation whose first step fails: nothing to compensate, the mesh FAILED.
    w.one(StartMeshFormation(f.failed_mesh_saga, f.failed_mesh, "ring", {}, 2, 4))
    spec = MESH_STEPS[0]
    taken = w.one(
        TakeStep(f.failed_mesh_saga, "p", spec.name, None, spec.timeout_seconds, spec.compensation)
    )
    failed = w.one(FinishStep(f.failed_mesh_saga, spec.name, "p", taken.fence, False, error="no"))
    assert failed.saga_state == "COMPENSATED"

    w.run(TerminateAgent(f.agent, "done"))
    w.run(DissolveMesh(f.mesh, "done"))
    return f


class Models:
    """A store with a writer, and both read models of one test (all dropped afterwards)."""

    def __init__(self, name: str):
        self.name = name
        self.settings = SETTINGS.with_changes(
            store_schema=f"{name}_store", read_schema=f"{name}_read", redis_prefix=name
        )
        self.store = open_store(self.settings)
        self.writer = Writer(self.store)
        self.postgres = self.model_pg(self.settings.read_schema)
        self.redis = RedisReadModel(self.settings.redis_url, name)
        self.others: list[Any] = []
        self.fleet: Fleet | None = None

    def model_pg(self, schema: str) -> PostgresReadModel:
        model = PostgresReadModel(
            self.settings.database_url, schema, StoreReader(self.store).first_event
        )
        model.create()
        return model

    def messages(self) -> list[EventMessage]:
        reader = StoreReader(self.store)
        position, out = 0, list[EventMessage]()
        while True:
            last, page = reader.after(position)
            if last == position:
                return out
            out.extend(page)
            position = last

    def apply(self, messages: list[EventMessage], batch: int = 7) -> None:
        """Apply as a projector does, in batches; no gap may be left."""
        apply(messages, batch, self.postgres, self.redis)

    def dumps(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.postgres.dump(), self.redis.dump()

    def fresh(self, suffix: str) -> tuple[PostgresReadModel, RedisReadModel]:
        """Another pair of read models (dropped with this test's)."""
        postgres = self.model_pg(f"{self.name}_{suffix}")
        cache = RedisReadModel(self.settings.redis_url, f"{self.name}_{suffix}")
        self.others += [postgres, cache]
        return postgres, cache

    def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.settings.database_url) as conn:
            text = sql.SQL(query).format(schema=sql.Identifier(self.settings.read_schema))
            return [tuple(r) for r in conn.execute(text, params).fetchall()]

    def close(self) -> None:
        for model in (self.postgres, self.redis, *self.others):
            with contextlib.suppress(Exception):
                model.close()
        self.store.close()
        drop_everything(self.name)


def apply(messages: list[EventMessage], batch: int, *models: Any) -> None:
    for model in models:
        for start in range(0, len(messages), batch):
            assert model.apply(messages[start : start + batch]) == []


@pytest.fixture
def models() -> Iterator[Models]:
    made = Models(f"it_fleet_{uuid4().hex[:10]}")
    try:
        yield made
    finally:
        made.close()


def views(models: Models) -> tuple[dict[str, Any], ...]:
    """What the API's views answer, read through their own pools."""

    async def read() -> tuple[dict[str, Any], ...]:
        pg = PostgresViews(models.settings.database_url, models.settings.read_schema)
        cache = RedisViews(models.settings.redis_url, models.name)
        await pg.open()
        try:
            f = models.fleet
            assert f is not None
            return (
                {
                    "agent": await pg.agent(agent_id(f.agent)),
                    "missing agent": await pg.agent(agent_id(uuid4())),
                    "mesh": await pg.mesh(mesh_id(f.mesh)),
                    "meshes": await pg.meshes(None, 10),
                    "failed meshes": await pg.meshes("FAILED", 10),
                    "sagas": await pg.sagas([], None, 10),
                    "ended spawns": await pg.sagas(
                        ["COMPENSATED", "ABORTED"], "agent_spawning", 10
                    ),
                    "context": await pg.context("ctx-1"),
                    "target": await pg.target_status("t-1"),
                    "idle target": await pg.target_status("t-2"),
                    "missing target": await pg.target_status("t-3"),
                },
                await pg.fleet_counts(),
                await cache.fleet(),
            )
        finally:
            await pg.close()
            await cache.close()

    return asyncio.run(read())


def test_the_fleets_rows_follow_the_domain_and_a_second_delivery_changes_nothing(
    models: Models,
) -> None:
    f = models.fleet = scenario(models.writer)
    messages = models.messages()
    kinds = {m.type for m in messages}
    assert {"AgentSpawning.CompensationFailed", "AgentSpawning.Aborted", "Mesh.Dissolved"} <= kinds
    models.apply(messages)
    first = models.dumps()

    # seed 000's tables: t-1 holds nothing now (one agent terminated, one compensated).
    target = models.rows(
        "SELECT id, state, capabilities, current_workloads, resource_usage, last_heartbeat, "
        "last_updated, resource_limits, reservations, aggregate_id FROM {schema}.target_states "
        "ORDER BY id"
    )
    last_t1 = max(m.data["at"] for m in messages if m.aggregate_id == target_uuid("t-1"))
    naive = last_t1.astimezone(UTC).replace(tzinfo=None)
    assert target[0] == (
        "t-1", READY, {"gpu": "a100"}, 0, {"cpu_millicores": 0, "memory_bytes": 0}, naive, naive,
        {"cpu_millicores": 2000, "memory_bytes": 4 * GIB, "max_workloads": 3}, {},
        target_uuid("t-1"),
    )  # fmt: skip
    assert target[1][:4] == ("t-2", "MAINTENANCE", {}, 0)
    contexts = models.rows("SELECT id, hierarchies, properties FROM {schema}.execution_contexts")
    assert contexts == [("ctx-1", ["org", "team", "me"], {"k": "w"})]
    types = models.rows(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name IN ('target_states', 'execution_contexts') "
        "AND data_type LIKE 'timestamp%%'",
        models.settings.read_schema,
    )
    assert {t[2] for t in types} == {"timestamp without time zone"} and len(types) == 4

    agent = models.rows(
        "SELECT target_id, mesh_id, state, capabilities, performance, cpu_millicores, "
        "memory_bytes, saga_id, ended_at IS NOT NULL FROM {schema}.agents WHERE id = %s",
        agent_id(f.agent),
    )
    assert agent == [
        ("t-1", None, "TERMINATED", {"gpu": "a100", "lang": "py"},
         {"latency": 1.5, "throughput": 20.0}, 500, GIB, saga_id(f.spawn), True)
    ]  # fmt: skip
    # The other spawns' agents were never initialized.
    assert models.rows("SELECT id FROM {schema}.agents") == [(agent_id(f.agent),)]

    meshes = models.rows(
        "SELECT id, state, topology, required_capabilities, min_members, max_members, members, "
        "performance, saga_id, formed_at IS NOT NULL, ended_at IS NOT NULL FROM {schema}.meshes "
        "ORDER BY updated_at"
    )
    assert sorted(meshes) == sorted(
        [
            (mesh_id(f.mesh), "DISSOLVED", "full", {"gpu": "a100"}, 1, 3, [], {"latency": 0.5},
             saga_id(f.mesh_saga), True, True),
            (mesh_id(f.failed_mesh), "FAILED", "ring", {}, 2, 4, [], {},
             saga_id(f.failed_mesh_saga), False, True),
        ]
    )  # fmt: skip

    sagas = dict(
        (r[0], r[1:])
        for r in models.rows("SELECT id, kind, state, reason IS NOT NULL FROM {schema}.sagas")
    )
    assert sagas == {
        saga_id(f.mesh_saga): ("mesh_formation", "COMPLETED", False),
        saga_id(f.spawn): ("agent_spawning", "COMPLETED", False),
        saga_id(f.compensated): ("agent_spawning", "COMPENSATED", True),
        saga_id(f.aborted): ("agent_spawning", "ABORTED", True),
        saga_id(f.failed_mesh_saga): ("mesh_formation", "COMPENSATED", True),
    }
    steps = models.rows(
        "SELECT name, state, fence, outcome, error, compensation, compensated_at IS NOT NULL, "
        "compensation_attempts, last_error FROM {schema}.saga_steps WHERE saga_id = %s "
        "ORDER BY started_at",
        saga_id(f.compensated),
    )
    assert steps == [
        ("reserve_resources", "COMPENSATED", 4,
         {"targetId": "t-1", "cpu_millicores": 250, "memory_bytes": GIB}, None,
         "release_resources", True, 1, "nope"),
        ("initialize_agent_state", "FAILED", 2, None, "x", "cleanup_agent_state", False, 0, None),
    ]  # fmt: skip
    aborted = models.rows(
        "SELECT name, state, error, compensation_attempts FROM {schema}.saga_steps "
        "WHERE saga_id = %s",
        saga_id(f.aborted),
    )
    assert aborted == [("reserve_resources", "TIMED_OUT", "timed out: did not finish in time", 5)]

    # A second delivery of every event, and a third in another legal order, change nothing.
    models.apply(messages)
    models.apply(in_kafka_order(messages), batch=3)
    assert models.dumps() == first

    # Applied in another legal order from the start, the models are the same.
    postgres, cache = models.fresh("other")
    apply(in_kafka_order(messages), 5, postgres, cache)
    pg_dump, cache_dump = postgres.dump(), cache.dump()
    assert pg_dump == first[0]
    assert cache_dump == first[1]

    answers, counts, cached = views(models)
    assert answers["agent"] is not None and answers["agent"]["state"] == "TERMINATED"
    assert answers["agent"]["performance"] == {"latency": 1.5, "throughput": 20.0}
    assert answers["missing agent"] is None
    assert answers["mesh"] is not None and answers["mesh"]["state"] == "DISSOLVED"
    assert [m["meshId"] for m in answers["failed meshes"]] == [mesh_id(f.failed_mesh)]
    assert len(answers["meshes"]) == 2
    assert answers["sagas"][0]["id"] == saga_id(f.failed_mesh_saga)
    assert {s["id"] for s in answers["ended spawns"]} == {
        saga_id(f.compensated),
        saga_id(f.aborted),
    }
    context = answers["context"]
    assert context is not None
    assert (context["contextId"], context["hierarchies"], context["properties"]) == (
        "ctx-1",
        ["org", "team", "me"],
        {"k": "w"},
    )
    assert context["createdAt"] < context["updatedAt"] and context["updatedAt"].endswith("Z")
    assert answers["target"] == {
        "target_id": "t-1",
        "state": READY,
        "current_workloads": 0,
        "resource_usage": {"cpu_usage": 0.0, "memory_usage": 0.0},
        "last_heartbeat": last_t1.isoformat().replace("+00:00", "Z"),
    }
    assert answers["idle target"] is not None
    assert answers["idle target"]["resource_usage"] == {"cpu_usage": 0.0, "memory_usage": 0.0}
    assert answers["missing target"] is None

    expected = {
        "targets": {"READY": 1, "MAINTENANCE": 1},
        "agents": {"TERMINATED": 1},
        "meshes": {"DISSOLVED": 1, "FAILED": 1},
        "sagas": {"COMPLETED": 2, "COMPENSATED": 2, "ABORTED": 1},
        "agent_spawning": {"COMPLETED": 1, "COMPENSATED": 1, "ABORTED": 1},
        "mesh_formation": {"COMPLETED": 1, "COMPENSATED": 1},
        "targetWorkloads": {"t-1": 0, "t-2": 0},
    }
    assert counts == expected
    assert cached == expected


def test_usage_and_membership_while_agents_are_placed(models: Models) -> None:
    """Midway: two agents hold reservations on t-1, one of them in an ACTIVE mesh; a mesh
    formation is under way (FORMING) and one spawn saga is RUNNING."""
    w = models.writer
    mesh, agent, other = uuid4(), uuid4(), uuid4()
    w.one(UpdateTarget("t-1", READY, {"gpu": "a100"}, Limits(2000, 4 * GIB, 3)))
    w.form_mesh(uuid4(), mesh, min_members=1)
    w.spawn(uuid4(), agent, mesh)
    w.spawn(uuid4(), other, None)
    forming = uuid4()
    w.one(StartMeshFormation(uuid4(), forming, "star", {}, 0, 5))
    w.one(StartSpawn(uuid4(), uuid4(), "t-1", None, {}, 1, 1))
    models.apply(models.messages())

    answers, counts, cached = views_midway(models, mesh, forming)
    assert answers["target"]["current_workloads"] == 2
    assert answers["target"]["resource_usage"] == {"cpu_usage": 0.5, "memory_usage": 0.5}
    assert answers["mesh"]["state"] == "ACTIVE"
    assert answers["mesh"]["members"] == [agent_id(agent)]
    assert answers["forming"]["state"] == "FORMING"
    assert answers["forming"]["formedAt"] is None
    assert answers["agent"]["meshId"] == mesh_id(mesh)
    expected = {
        "targets": {"READY": 1},
        "agents": {"ACTIVE": 2},
        "meshes": {"ACTIVE": 1, "FORMING": 1},
        "sagas": {"COMPLETED": 3, "RUNNING": 2},
        "agent_spawning": {"COMPLETED": 2, "RUNNING": 1},
        "mesh_formation": {"COMPLETED": 1, "RUNNING": 1},
        "targetWorkloads": {"t-1": 2},
    }
    assert counts == expected
    assert cached == expected


def views_midway(models: Models, mesh: UUID, forming: UUID) -> tuple[Any, ...]:
    async def read() -> tuple[Any, ...]:
        pg = PostgresViews(models.settings.database_url, models.settings.read_schema)
        cache = RedisViews(models.settings.redis_url, models.name)
        await pg.open()
        try:
            members = (await pg.mesh(mesh_id(mesh)) or {})["members"]
            return (
                {
                    "target": await pg.target_status("t-1"),
                    "mesh": await pg.mesh(mesh_id(mesh)),
                    "forming": await pg.mesh(mesh_id(forming)),
                    "agent": await pg.agent(members[0]),
                },
                await pg.fleet_counts(),
                await cache.fleet(),
            )
        finally:
            await pg.close()
            await cache.close()

    return asyncio.run(read())


def test_views_of_a_read_model_not_yet_created_are_empty() -> None:
    async def read() -> tuple[Any, ...]:
        pg = PostgresViews(SETTINGS.database_url, f"it_fleet_absent_{uuid4().hex[:8]}")
        await pg.open()
        try:
            return (
                await pg.agent(agent_id(uuid4())),
                await pg.sagas([], None, 5),
                await pg.target_status("t-1"),
                await pg.fleet_counts(),
            )
        finally:
            await pg.close()

    agent, sagas, target, counts = asyncio.run(read())
    assert (agent, sagas, target) == (None, [], None)
    assert counts["agents"] == {} and counts["targetWorkloads"] == {}
