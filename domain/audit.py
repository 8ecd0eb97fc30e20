"""Audit: an entity's whole history, read from the event store itself.

Each family declares the entities it shows (:attr:`domain.family.Family.audit`):
most are one aggregate's events (:func:`whole`); a family may narrow an
aggregate's events to one entity inside it (a task of a task block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from domain.family import Family
from domain.ids import UnknownIdError

History = list[dict[str, Any]]
#: ``(public id, source) -> the entity's events, or None when there is no such entity``.
View = Callable[[str, Any], History | None]


class EventSource(Protocol):
    def stored_events(self, uuid: UUID) -> Iterable[Any]: ...

    def load(self, uuid: UUID) -> Any: ...


def plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    return value


def record(event: Any, data: Mapping[str, Any]) -> dict[str, Any]:
    """One event as the audit API shows it."""
    return {
        "type": type(event).__qualname__,
        "version": event.originator_version,
        "timestamp": event.timestamp.isoformat(),
        "data": {k: plain(v) for k, v in data.items()},
    }


def fields(event: Any) -> dict[str, Any]:
    """An event's own fields, without the envelope's."""
    return {
        k: v
        for k, v in vars(event).items()
        if k not in ("originator_id", "originator_version", "timestamp", "originator_topic")
    }


def whole(parse: Callable[[str], UUID], kind: type) -> View:
    """The view of an aggregate's every event, for ids ``parse`` reads and aggregates of ``kind``."""
    prefix = kind.__qualname__ + "."

    def view(entity_id: str, source: EventSource) -> History | None:
        events = list(source.stored_events(parse(entity_id)))
        if not events or not type(events[0]).__qualname__.startswith(prefix):
            return None
        return [record(e, fields(e)) for e in events]

    return view


class AuditLog:
    """Every family's audit views, by public entity name."""

    def __init__(self, source: EventSource, families: Sequence[Family] | None = None):
        from domain import registry

        self.source = source
        self.views: dict[str, View] = {
            name: view
            for family in (families if families is not None else registry.FAMILIES)
            for name, view in family.audit.items()
        }

    @property
    def entities(self) -> tuple[str, ...]:
        """The entity names an auditor may ask for (``job``, ``task``, ``spot``...)."""
        return tuple(self.views)

    def load(self, uuid: UUID) -> Any:
        """An aggregate as its stored events make it (None if there is none)."""
        return self.source.load(uuid)

    def history(self, aggregate: str, entity_id: str) -> History | None:
        """Every event of the entity in order, or None if there is no such entity."""
        view = self.views.get(aggregate)
        if view is None:
            return None
        try:
            return view(entity_id, self.source)
        except UnknownIdError:
            return None
