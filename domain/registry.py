"""The one list of aggregate families, and what is derived from their declarations.

Adding a family is one package under ``domain/`` and one line here (see the
checklist in docs/design.md). The Avro schemas, the relay's topic routing, the
projectors' subscriptions, the API's answers and the audit view all follow from
:data:`FAMILIES`; ``tests/unit/test_registry.py`` fails when an event has no
schema, no topic, or no handler in a read model.
"""

from __future__ import annotations

from eventsourcing.persistence import Transcoding

from domain import agents, contexts, jobs, meshes, sagas, spots, system, targets, workflows
from domain.family import Family

FAMILIES: tuple[Family, ...] = (
    workflows.FAMILY,
    jobs.FAMILY,
    spots.FAMILY,
    targets.FAMILY,
    contexts.FAMILY,
    agents.FAMILY,
    meshes.FAMILY,
    sagas.FAMILY,
    system.FAMILY,
)

#: Every event Tadpole stores, in the order the schemas are listed.
EVENTS: tuple[type, ...] = tuple(e for f in FAMILIES for e in f.events)

#: Every result a handler may give (the API answers each).
RESULTS: tuple[type, ...] = tuple(dict.fromkeys(r for f in FAMILIES for r in f.results))


#: How the store encodes what the families' aggregates hold beyond plain values.
TRANSCODINGS: tuple[Transcoding, ...] = tuple(t for f in FAMILIES for t in f.transcodings)


def event_type(cls: type) -> str:
    """``TaskBlock.Claimed``: the message type of an event class."""
    return cls.__qualname__


#: Message type → the family that stores it.
FAMILY_OF_EVENT: dict[str, Family] = {event_type(e): f for f in FAMILIES for e in f.events}

#: Message type → the catalogue's name of the topic its events go to.
TOPIC_OF_EVENT: dict[str, str] = {event_type(e): f.topic_of(e) for f in FAMILIES for e in f.events}

#: The topic names (of the topic catalogue) the families' events go to.
TOPICS: tuple[str, ...] = tuple(dict.fromkeys(TOPIC_OF_EVENT.values()))


def topic_of(message_type: str) -> str:
    """The catalogue's name of the topic an event of ``message_type`` goes to."""
    return TOPIC_OF_EVENT[message_type]
