"""The event store: an ``eventsourcing`` application over PostgreSQL (or memory in tests)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Notification

log = logging.getLogger(__name__)


class TadpoleStore(Application[UUID]):
    """Append-only store of every job, task block and spot event.

    Snapshots are enabled; the command processor takes them every
    ``SNAPSHOT_INTERVAL`` events of an aggregate from the aggregate it holds, so
    taking one costs no read.
    """

    name = "Tadpole"
    is_snapshotting_enabled = True

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

    def save_all(self, events: Sequence[Any]) -> int:
        """Store ``events`` in one transaction; the notification id of the last one."""
        recordings = self.save(*events)
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


class StorePort:
    """Adapts :class:`TadpoleStore` to :class:`domain.commands.EventStore`."""

    def __init__(self, store: TadpoleStore):
        self.store = store
        self.last_position = 0

    def load(self, uuid: UUID) -> Aggregate | None:
        return self.store.load(uuid)

    def save(self, events: Sequence[Any], snapshots: Sequence[Any]) -> None:
        """Append ``events``; then store ``snapshots``, best effort.

        Once the events are stored the batch stands: a snapshot only speeds up
        loading, and the aggregate's next hundred events bring another.
        """
        self.last_position = self.store.save_all(events)
        if snapshots and self.store.snapshots is not None:
            try:
                self.store.snapshots.put(list(snapshots))
            except Exception:
                log.warning("storing %d snapshots failed", len(snapshots), exc_info=True)

    def ids_of(self, topics: Sequence[str]) -> list[UUID]:
        return self.store.ids_of(topics)


def memory_env() -> dict[str, Any]:
    return {"PERSISTENCE_MODULE": "eventsourcing.popo"}
