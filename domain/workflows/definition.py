"""The registered versions of one workflow (namespace and name); each version is immutable."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.workflows.definitions import Definition, parsed


class WorkflowDefinition(Aggregate):
    """Every registered version of one workflow, the latest last."""

    class Registered(Aggregate.Created):
        namespace: str
        name: str

    @event(Registered)
    def __init__(self, namespace: str, name: str):
        self.namespace = namespace
        self.name = name
        self.versions: dict[str, str] = {}
        self.latest: str | None = None

    @classmethod
    def create(cls, uuid: UUID, namespace: str, name: str) -> WorkflowDefinition:
        return cls._create(cls.Registered, id=uuid, namespace=namespace, name=name)

    class VersionRegistered(Aggregate.Event):
        workflow_version: str
        definition: str
        at: datetime

    @event(VersionRegistered)
    def add_version(self, workflow_version: str, definition: str, at: datetime) -> None:
        self.versions[workflow_version] = definition
        self.latest = workflow_version

    def text(self, version: str | None = None) -> str | None:
        """A registered version as stored (the latest if none is named)."""
        return self.versions.get(version or self.latest or "")

    def definition(self, version: str | None = None) -> Definition | None:
        """A registered version (the latest if none is named)."""
        text = self.text(version)
        return parsed(text) if text is not None else None
