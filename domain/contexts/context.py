"""An execution context (seed 000's ModifyContext): hierarchies and properties."""

from __future__ import annotations

import json
from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.values import compact_json


class Context(Aggregate):
    """One context (id: from the caller's context id). A modification replaces both
    its hierarchies and its properties (``PUT``)."""

    class Created(Aggregate.Created):
        context_id: str
        hierarchies: list[str]
        properties: str  # JSON object of strings
        at: datetime

    @classmethod
    def create(
        cls,
        uuid: UUID,
        context_id: str,
        hierarchies: list[str],
        properties: dict[str, str],
        at: datetime,
    ) -> Context:
        return cls._create(
            cls.Created,
            id=uuid,
            context_id=context_id,
            hierarchies=list(hierarchies),
            properties=compact_json(properties),
            at=at,
        )

    @event(Created)
    def __init__(self, context_id: str, hierarchies: list[str], properties: str, at: datetime):
        self.context_id = context_id
        self.created_at = at
        self._set(hierarchies, properties, at)

    def _set(self, hierarchies: list[str], properties: str, at: datetime) -> None:
        self.hierarchies = list(hierarchies)
        self.properties: dict[str, str] = json.loads(properties)
        self.updated_at = at

    class Modified(Aggregate.Event):
        hierarchies: list[str]
        properties: str
        at: datetime

    @event(Modified)
    def _modified(self, hierarchies: list[str], properties: str, at: datetime) -> None:
        self._set(hierarchies, properties, at)

    def modify(self, hierarchies: list[str], properties: dict[str, str], at: datetime) -> bool:
        """False (and no event) when nothing changes."""
        if list(hierarchies) == self.hierarchies and properties == self.properties:
            return False
        self._modified(list(hierarchies), compact_json(properties), at)
        return True
