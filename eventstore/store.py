"""The event store: an ``eventsourcing`` application over PostgreSQL (or memory in tests).

Infrastructure, not domain: the command side sees it through
:class:`domain.processor.EventStore`, which :class:`StorePort` adapts it to.
Beside the events it keeps the index of open work (see :mod:`domain.processor`),
changed in the same transaction as the events that open or close the work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Notification, Recording

from eventstore.recorder import OneTripRecorder

log = logging.getLogger(__name__)


class TadpoleStore(Application[UUID]):
    """Append-only store of every family's events.

    Snapshots are enabled; the command processor takes them every
    ``SNAPSHOT_INTERVAL`` events of an aggregate from the aggregate it holds, so
    taking one costs no read.
    """

    name = "Tadpole"
    is_snapshotting_enabled = True

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        super().__init__(env=dict(env or {}))
        #: The index of open work of a store in memory (a PostgreSQL store keeps its own).
        self._open: dict[UUID, str] = {}

    def register_transcodings(self, transcoder: Any) -> None:
        """The library's, and those of every family (:data:`domain.registry.TRANSCODINGS`):
        what the store decodes is the domain's, so it reads the domain's list."""
        super().register_transcodings(transcoder)
        from domain.registry import TRANSCODINGS

        for transcoding in TRANSCODINGS:
            transcoder.register(transcoding)

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

    def save_all(
        self,
        events: Sequence[Any],
        opened: Mapping[UUID, str] | None = None,
        closed: Sequence[UUID] = (),
    ) -> int:
        """Store ``events`` in one transaction, with the changes to the index of open
        work; the notification id of the last one."""
        recordings = self.save(*events, opened=opened or {}, closed=closed)
        return recordings[-1].notification.id if recordings else 0

    def save(
        self,
        *objs: Any,
        opened: Mapping[UUID, str] | None = None,
        closed: Sequence[UUID] = (),
        **kwargs: Any,
    ) -> list[Recording[UUID]]:
        """The library's save, with the changes to the index of open work in the same
        transaction (kept here for a store in memory)."""
        opened = opened or {}
        recordings = super().save(*objs, opened=opened, closed=closed, **kwargs)
        if not isinstance(self.recorder, OneTripRecorder) and recordings:
            self._open.update(opened)
            for uuid in closed:
                self._open.pop(uuid, None)
        return recordings

    def open_aggregates(self) -> dict[UUID, str] | None:
        """The index of open work (id → aggregate class name); None until it is built."""
        if isinstance(self.recorder, OneTripRecorder):
            return self.recorder.open_aggregates()
        return dict(self._open)

    def build_open_index(self, opened: Mapping[UUID, str]) -> None:
        if isinstance(self.recorder, OneTripRecorder):
            self.recorder.build_open_index(opened)
        else:
            self._open = dict(opened)

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
    """Adapts :class:`TadpoleStore` to :class:`domain.processor.EventStore`."""

    def __init__(self, store: TadpoleStore):
        self.store = store

    def load(self, uuid: UUID) -> Aggregate | None:
        return self.store.load(uuid)

    def save(
        self,
        events: Sequence[Any],
        snapshots: Sequence[Any],
        opened: Mapping[UUID, str] | None = None,
        closed: Sequence[UUID] = (),
    ) -> None:
        """Append ``events`` (and change the index of open work); then store
        ``snapshots``, best effort.

        Once the events are stored the batch stands: a snapshot only speeds up
        loading, and the aggregate's next hundred events bring another.
        """
        if events:
            self.store.save_all(events, opened, closed)
        if snapshots and self.store.snapshots is not None:
            try:
                self.store.snapshots.put(list(snapshots))
            except Exception:
                log.warning("storing %d snapshots failed", len(snapshots), exc_info=True)

    def ids_of(self, topics: Sequence[str]) -> list[UUID]:
        return self.store.ids_of(topics)

    def open_aggregates(self) -> dict[UUID, str] | None:
        return self.store.open_aggregates()

    def build_open_index(self, opened: Mapping[UUID, str]) -> None:
        self.store.build_open_index(opened)


def memory_env() -> dict[str, Any]:
    return {"PERSISTENCE_MODULE": "eventsourcing.popo"}
