"""The state of a low-rate family: nothing open in memory, the recently used kept.

Targets, contexts, agents and meshes change a few times a minute, not thousands
of times a second: their handlers load, decide and add through the batch's
:class:`~domain.processor.UnitOfWork`, and this state keeps the last
``Config.recent`` aggregates they touched so that a burst of commands on one
target reads the store once. Their commands declare what they read
(:attr:`domain.family.Family.reads`), so a new id is found absent without a read
on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.family import Config, Loader, Phase, Recent
from domain.processor import UnitOfWork

_W = TypeVar("_W")


class LowRate(Generic[_W]):
    """Holds the recently used aggregates of a family; its batch work is ``work(state, uow)``."""

    def __init__(self, config: Config, work: Callable[[LowRate[_W], UnitOfWork], _W]):
        self.recent: Recent[UUID, Aggregate] = Recent(config.recent)
        self._work = work

    def recover(self, load: Loader, open_ids: Iterable[UUID], now: datetime) -> None:
        self.recent.clear()

    def begin(self, uow: UnitOfWork) -> _W:
        return self._work(self, uow)

    def held(self, uuid: UUID) -> Aggregate | None:
        return self.recent.get(uuid)

    def keep(self, aggregate: Aggregate) -> None:
        self.recent.put(aggregate.id, aggregate)


class LowRateWork:
    """A low-rate family's part of one batch: handlers are methods of a subclass."""

    def __init__(self, state: Any, uow: UnitOfWork):
        self.state = state
        self.uow = uow

    def end_phase(self, phase: Phase) -> None:
        pass

    def commit(self) -> None:
        pass


def low_rate(work: Callable[[Any, UnitOfWork], _W]) -> Callable[[Config], LowRate[_W]]:
    """``Family.state`` of a low-rate family whose batch work class is ``work``."""
    return lambda config: LowRate(config, work)
