"""The group-commit writer with an appender on the event loop (the API's hot path)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from domain.commands import CommandProcessor, Heartbeat, Hello, Ok, SpotRegistered
from domain.store import StorePort, TadpoleStore, memory_env
from service.writer import GroupCommitWriter


class SnapshotsFail(StorePort):
    """A store port over a store that stores events but refuses every snapshot."""

    def __init__(self, store: TadpoleStore):
        super().__init__(store)
        self.refused = 0

        def refuse(snapshots: Sequence[Any]) -> None:
            self.refused += 1
            raise ConnectionError("the snapshot table is unreachable")

        assert store.snapshots is not None
        store.snapshots.put = refuse  # type: ignore[method-assign]


async def test_a_refused_snapshot_does_not_fail_a_stored_batch() -> None:
    store = TadpoleStore(memory_env())
    port = SnapshotsFail(store)
    processor = CommandProcessor(port, 3, 5.0)

    async def append(events: Sequence[Any]) -> list[int]:
        return [r.notification.id for r in store.save(*events)]

    writer = GroupCommitWriter(processor, append=append)
    writer.start()
    try:
        hello = await writer.submit(Hello("10.0.0.1"))
        assert isinstance(hello, SpotRegistered)
        # Every heartbeat reports new figures, so each stores an event: the 100th
        # version of the spot comes with a snapshot, which the store refuses.
        for n in range(1, 101):
            answer = await writer.submit(Heartbeat(hello.spot_id, cpu_load=n / 1000))
            assert isinstance(answer, Ok), (n, answer)
        assert port.refused == 1
        assert not processor.needs_recovery
        spot = store.repository.get(processor.spots[next(iter(processor.spots))].id)
        assert spot.version == 101
    finally:
        await writer.stop()
