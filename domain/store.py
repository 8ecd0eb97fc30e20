"""The event store: an ``eventsourcing`` application over PostgreSQL (or memory in tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Notification

from domain.jobs import Job
from domain.spots import Spot
from domain.tasks import TaskBlock

SNAPSHOT_INTERVAL = 100


class TadpoleStore(Application[UUID]):
    """Append-only store of every job, task block and spot event.

    Snapshots are taken every :data:`SNAPSHOT_INTERVAL` events of an aggregate,
    from the aggregate the writer already holds, so taking one costs no read.
    """

    name = "Tadpole"
    snapshotting_intervals = {  # noqa: RUF012 - the library's class attribute
        Job: SNAPSHOT_INTERVAL,
        TaskBlock: SNAPSHOT_INTERVAL,
        Spot: SNAPSHOT_INTERVAL,
    }

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env=dict(env or {}))

    # ---- the port the command processor uses ---------------------------------------

    def load(self, uuid: UUID) -> Aggregate | None:
        try:
            aggregate: Aggregate = self.repository.get(uuid)
        except AggregateNotFoundError:
            return None
        return aggregate

    def stored_events(self, uuid: UUID) -> list[Any]:
        """Every stored event of an aggregate, oldest first (snapshots aside)."""
        return list(self.events.get(uuid))

    def save_all(self, aggregates: Sequence[Aggregate]) -> int:
        """Store every pending event of ``aggregates`` in one transaction.

        Returns the notification id of the last event stored.
        """
        recordings = self.save(*aggregates)
        return recordings[-1].notification.id if recordings else 0

    def ids_of(self, topics: Sequence[str]) -> list[UUID]:
        ids: list[UUID] = []
        start = 1
        while True:
            page = self.recorder.select_notifications(start, 1000, topics=list(topics))
            ids.extend(UUID(str(n.originator_id)) for n in page)
            if len(page) < 1000:
                return ids
            start = page[-1].id + 1

    def notifications(self, after: int, limit: int) -> Sequence[Notification]:
        return self.recorder.select_notifications(after + 1, limit)

    def max_position(self) -> int:
        return self.recorder.max_notification_id() or 0

    def _take_snapshots(self, processing_event: ProcessingEvent[UUID]) -> None:
        if self.snapshots is None:
            return
        snapshots = []
        for aggregate in processing_event.aggregates.values():
            versions = [
                e.originator_version
                for e in processing_event.events
                if e.originator_id == aggregate.id
            ]
            crossed = {v // SNAPSHOT_INTERVAL for v in versions} - {
                (min(versions) - 1) // SNAPSHOT_INTERVAL
            }
            if versions and crossed and isinstance(aggregate, Aggregate):
                snapshots.append(Aggregate.Snapshot.take(aggregate))
        if snapshots:
            self.snapshots.put(snapshots)


class StorePort:
    """Adapts :class:`TadpoleStore` to :class:`domain.commands.EventStore`."""

    def __init__(self, store: TadpoleStore):
        self.store = store
        self.last_position = 0

    def load(self, uuid: UUID) -> Aggregate | None:
        return self.store.load(uuid)

    def save(self, aggregates: Sequence[Aggregate]) -> None:
        self.last_position = self.store.save_all(aggregates)

    def ids_of(self, topics: Sequence[str]) -> list[UUID]:
        return self.store.ids_of(topics)


def memory_env() -> dict[str, Any]:
    return {"PERSISTENCE_MODULE": "eventsourcing.popo"}
