"""The registry: every event, command and result the families declare is served everywhere.

A new family's events need a committed Avro schema, a topic with settings, and a
handler (or an explicit "not shown here") in every read model; its results need
an HTTP answer; its entities an audit view. :func:`problems` lists what is
missing, and the real registry must have none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eventsourcing.domain import Aggregate

from api.errors import RESPONSES
from domain import registry
from domain.family import Family
from domain.registry import event_type
from projections.postgres.tables import PostgresReadModel
from projections.redis.dashboards import RedisReadModel
from schemas.events import AVRO_DIR
from streaming.topics import TOPIC_SETTINGS, TopicCatalogue

READ_MODELS = (PostgresReadModel, RedisReadModel)


def problems(families: Sequence[Family]) -> list[str]:
    """Everything the families declare that some part of Tadpole does not serve."""
    found = []
    for family in families:
        for topic in dict.fromkeys(family.topic_of(e) for e in (*family.events, None)):
            if topic not in TOPIC_SETTINGS:
                found.append(f"{family.name}: topic {topic!r} has no settings")
        for event in family.events:
            kind = event_type(event)
            if not (AVRO_DIR / f"{kind}.avsc").exists():
                found.append(f"{kind}: no schema (run `make schemas`)")
            for model in READ_MODELS:
                if kind not in model.HANDLED | model.NOT_SHOWN:
                    found.append(f"{kind}: {model.__name__} neither handles it nor says NOT_SHOWN")
        for result in family.results:
            if result not in RESPONSES:
                found.append(f"{result.__name__}: no HTTP answer in api.errors.RESPONSES")
        if not family.handlers:
            found.append(f"{family.name}: no command handlers")
    return found


def test_every_declared_event_result_and_topic_is_served() -> None:
    assert problems(registry.FAMILIES) == []


class Gadget(Aggregate):
    class Made(Aggregate.Created):
        name: str


@dataclass(frozen=True)
class MakeGadget:
    name: str


@dataclass(frozen=True)
class GadgetMade:
    gadget_id: str


def test_a_family_left_out_anywhere_is_reported() -> None:
    gadgets = Family(
        name="gadgets",
        events=(Gadget.Made,),
        topic="gadgets",
        handlers={MakeGadget: lambda work, command: GadgetMade("g")},
        results=(GadgetMade,),
        state=lambda config: None,  # type: ignore[arg-type, return-value]
    )
    assert problems([gadgets]) == [
        "gadgets: topic 'gadgets' has no settings",
        "Gadget.Made: no schema (run `make schemas`)",
        "Gadget.Made: PostgresReadModel neither handles it nor says NOT_SHOWN",
        "Gadget.Made: RedisReadModel neither handles it nor says NOT_SHOWN",
        "GadgetMade: no HTTP answer in api.errors.RESPONSES",
    ]


def test_each_event_goes_to_its_familys_topic() -> None:
    catalogue = TopicCatalogue("t")
    for family in registry.FAMILIES:
        for event in family.events:
            assert catalogue.topic_for(event_type(event)) == f"t.{family.topic_of(event)}"
    assert set(catalogue.event_topics) == {
        f"t.{f.topic_of(e)}" for f in registry.FAMILIES for e in f.events
    }
    assert set(catalogue.event_topics) <= set(catalogue.all_topics)


def test_a_deployment_may_set_every_event_topics_partitions() -> None:
    own = {spec.name: spec.partitions for spec in TopicCatalogue("t").specs()}
    seed_001 = {
        "t.system_events": 6,
        "t.performance_metrics": 12,
        "t.mesh_coordination": 8,
        "t.agent_lifecycle": 4,
    }
    assert own == {"t.workload": 6, **seed_001} | {f"{t}.dlq": 1 for t in ("t.workload", *seed_001)}
    one = {spec.name: spec.partitions for spec in TopicCatalogue("t", partitions=1).specs()}
    assert set(one.values()) == {1}
    three = {s.name: s.partitions for s in TopicCatalogue("t", partitions=3).specs()}
    assert three == {name: 1 if name.endswith(".dlq") else 3 for name in own}


def test_each_topic_has_seed_001s_settings() -> None:
    configs = {spec.name: dict(spec.config) for spec in TopicCatalogue("t").specs()}
    expected = {
        "t.system_events": ("604800000", "lz4", "delete"),
        "t.performance_metrics": ("2592000000", "snappy", "compact"),
        "t.mesh_coordination": ("259200000", "zstd", "delete"),
        "t.agent_lifecycle": ("1209600000", "lz4", "delete"),
    }
    for name, (retention, compression, cleanup) in expected.items():
        assert configs[name] == {
            "retention.ms": retention,
            "compression.type": compression,
            "cleanup.policy": cleanup,
        }


def test_every_command_has_exactly_one_handler() -> None:
    commands = [c for f in registry.FAMILIES for c in f.handlers]
    assert len(commands) == len(set(commands))
