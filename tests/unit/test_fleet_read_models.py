"""The fleet's read-model handlers, without a database: every event the domain makes in
the integration test's scenario becomes well-formed statements and Redis ops."""

from __future__ import annotations

import re

from eventstore.store import TadpoleStore, memory_env
from projections.postgres import fleet
from projections.redis.dashboards import APPLY, HANDLERS, RedisKeys
from schemas.codec import EventMessage
from streaming.consumer import StoreReader
from tests.integration.test_fleet_projection import Writer, scenario

#: The Lua script's ``arity`` table: op → its number of arguments.
ARITY = {
    op: int(n)
    for op, n in re.findall(r"(\w+) = (\d)", re.search(r"local arity = \{(.*)\}", APPLY)[1])  # type: ignore[index]
}


def fleet_messages() -> list[EventMessage]:
    store = TadpoleStore(memory_env())
    scenario(Writer(store))
    return StoreReader(store).after(0, limit=100_000)[1]


def test_every_fleet_event_becomes_statements_with_as_many_parameters_as_placeholders() -> None:
    messages = fleet_messages()
    # Every handler but those of a mesh formation's compensation (the same as a spawn's).
    # (An aborted spawn also records the system's EmergencyStateActivated: not shown.)
    shown = {m.type for m in messages} - fleet.NOT_SHOWN
    assert shown == set(fleet.HANDLERS) - {
        "MeshFormation.StepTimedOut",
        "MeshFormation.CompensationTaken",
        "MeshFormation.StepCompensated",
        "MeshFormation.CompensationFailed",
        "MeshFormation.Aborted",
    }
    for m in messages:
        if m.type in fleet.NOT_SHOWN:
            continue
        for text, params in fleet.HANDLERS[m.type](m):
            assert text.count("%s") == len(params), (m.type, text)


def test_every_fleet_event_with_a_redis_handler_makes_ops_the_script_knows() -> None:
    keys = RedisKeys("p")
    for m in fleet_messages():
        handler = HANDLERS.get(m.type)
        for op in handler(keys, m) if handler else ():
            assert op[0] in ARITY and len(op) == ARITY[str(op[0])] + 1, (m.type, op)
