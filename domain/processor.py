"""The command side: decide a batch of commands, then store it in one transaction.

One :class:`CommandProcessor` is the single writer of every aggregate in a
deployment. It knows no family by name: :mod:`domain.registry` tells it which
handler decides which command, in which :class:`~domain.family.Phase`, and
which family state holds an aggregate. A batch is one :class:`UnitOfWork`:
handlers load, decide and change aggregates through it, and every aggregate it
touched is stored together, as one append.

Only open work stays in memory (the families' states decide what that is), and
the store keeps an index of it, written in the same transaction as the events:
start-up reads that index instead of replaying history, so its cost follows
the open work, not everything ever stored.

If the store refuses the batch, nothing of it was stored and every caller is
told so; the processor then reloads its state from the store before the next.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.family import BatchWork, Command, Config, Family, FamilyState, Ok, Phase, Result

log = logging.getLogger(__name__)

_A = TypeVar("_A", bound=Aggregate)
_S = TypeVar("_S")

SNAPSHOT_INTERVAL = 100


class EventStore(Protocol):
    """What the processor needs of the event store."""

    def load(self, uuid: UUID) -> Aggregate | None: ...

    def save(
        self,
        events: Sequence[Any],
        snapshots: Sequence[Any],
        opened: Mapping[UUID, str],
        closed: Sequence[UUID],
    ) -> None:
        """Append ``events`` atomically (optimistic concurrency per aggregate version),
        and in the same transaction add ``opened`` to the index of open work and
        take ``closed`` out of it."""
        ...

    def open_aggregates(self) -> dict[UUID, str] | None:
        """The index of open work (id → aggregate class name); None if it was never built."""
        ...

    def build_open_index(self, opened: Mapping[UUID, str]) -> None:
        """Replace the index of open work with ``opened`` and mark it built."""
        ...

    def ids_of(self, topics: Sequence[str]) -> list[UUID]:
        """Ids of the aggregates whose stored events include one of ``topics``."""
        ...


@dataclass
class Decided:
    """A decided batch: the answers, and what must be stored before they are sent."""

    results: list[Result]
    events: list[Any]
    snapshots: list[Any]
    versions: dict[UUID, int]
    #: Aggregates that became open work in this batch (id → class name), and that stopped.
    opened: dict[UUID, str] = field(default_factory=dict)
    closed: list[UUID] = field(default_factory=list)


class CommandProcessor:
    """Single writer of every family's aggregates (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        max_attempts: int = 3,
        heartbeat_store_interval: float = 5.0,
        families: Sequence[Family] | None = None,
        lease_seconds: float = 30.0,
    ):
        from domain import registry

        self.store = store
        self.config = Config(max_attempts, heartbeat_store_interval, lease_seconds=lease_seconds)
        self.families = tuple(families if families is not None else registry.FAMILIES)
        self._states: dict[str, FamilyState] = {f.name: f.state(self.config) for f in self.families}
        self._handlers: dict[type, tuple[Family, Any, Phase]] = {
            command: (family, handler, family.phases.get(command, Phase.BEGIN))
            for family in self.families
            for command, handler in family.handlers.items()
        }
        self._reads: dict[type, Any] = {
            command: reads for family in self.families for command, reads in family.reads.items()
        }
        self._family_of: dict[type, Family] = {}
        for family in self.families:
            for event in family.events:
                owner = _owner(event)
                if owner is not None:
                    self._family_of[owner] = family
        #: Ids in the store's index of open work, as this processor last wrote it.
        self._open: set[UUID] = set()
        self._stale = True

    # ---- state -------------------------------------------------------------------

    def state(self, kind: type[_S]) -> _S:
        """The family state of class ``kind`` (e.g. :class:`domain.jobs.state.OpenJobs`)."""
        for state in self._states.values():
            if isinstance(state, kind):
                return state
        raise LookupError(f"no family state is a {kind.__name__}")

    @property
    def needs_recovery(self) -> bool:
        """True when the in-memory state must be reloaded from the store first."""
        return self._stale

    def recover(self, now: datetime) -> None:
        """Reload every family's open work, found through the store's index of open work."""
        index = self.store.open_aggregates()
        if index is None:
            index = self._build_index()
        self._open = set(index)
        by_kind: dict[str, list[UUID]] = {}
        for uuid, kind in index.items():
            by_kind.setdefault(kind, []).append(uuid)
        for family in self.families:
            ids = [u for cls in family.open_when for u in by_kind.get(cls.__name__, [])]
            self._states[family.name].recover(self.load, ids, now)
        self._stale = False

    def _build_index(self) -> dict[UUID, str]:
        """The index of open work of a store written before there was one: found once,
        by loading every indexed aggregate, then stored."""
        opened: dict[UUID, str] = {}
        for family in self.families:
            for cls, is_open in family.open_when.items():
                topics = [_topic(e) for e in family.events if _owner(e) is cls]
                topics += [t for t, c in family.legacy_topics.items() if _owner(c) is cls]
                ids = self.store.ids_of(topics)
                log.warning(
                    "building the index of open work: loading %d %s aggregates once",
                    len(ids),
                    cls.__name__,
                )
                for uuid in ids:
                    aggregate = self.load(uuid, cls)
                    if aggregate is not None and is_open(aggregate):
                        opened[uuid] = cls.__name__
        self.store.build_open_index(opened)
        return opened

    def load(self, uuid: UUID, kind: type[_A]) -> _A | None:
        """The aggregate ``uuid`` from the store, if it is a ``kind``."""
        aggregate = self.store.load(uuid)
        return aggregate if isinstance(aggregate, kind) else None

    def held(self, uuid: UUID) -> Aggregate | None:
        """An aggregate some family state holds in memory."""
        for state in self._states.values():
            aggregate = state.held(uuid)
            if aggregate is not None:
                return aggregate
        return None

    def versions(self, uuids: Iterable[UUID]) -> dict[UUID, int]:
        """The versions of these aggregates that are in memory (for read-your-writes)."""
        found = {u: self.held(u) for u in uuids}
        return {u: a.version for u, a in found.items() if a is not None}

    def to_look_up(self, commands: Iterable[Command]) -> list[UUID]:
        """Aggregates these commands may load from the store and that are not in memory:
        what the writer asks the store about (without blocking) before deciding them."""
        wanted: dict[UUID, None] = {}
        for command in commands:
            reads = self._reads.get(type(command))
            if reads is not None:
                wanted.update((u, None) for u in reads(command) if self.held(u) is None)
        return list(wanted)

    def claimable(self, now: datetime, limit: int) -> int:
        """How many tasks claims could take now, from every family (counted up to ``limit``)."""
        found, ts = 0, now.timestamp()
        for family in self.families:
            if family.claimable is not None and found < limit:
                found += family.claimable(self._states[family.name], ts, limit - found)
        return found

    def family_of(self, aggregate: Aggregate) -> Family:
        return self._family_of[type(aggregate)]

    # ---- one batch -----------------------------------------------------------------

    def process(
        self, commands: Sequence[Command], now: datetime, absent: Collection[UUID] = ()
    ) -> list[Result]:
        """Decide every command, store the batch atomically, return one result each.

        Raises whatever the store raised if it refused the batch; then nothing was
        stored and the processor reloads before its next batch.
        """
        decided = self.decide(commands, now, absent)
        self.store_decided(decided)
        return decided.results

    def decide(
        self, commands: Sequence[Command], now: datetime, absent: Collection[UUID] = ()
    ) -> Decided:
        """Decide a batch against the state so far.

        ``absent``: aggregates the store was just found not to have (see
        :meth:`to_look_up`); handlers get None for them without reading the store.
        The batch's events are taken out of the aggregates here; :meth:`store_decided`
        (or the writer's appender) stores them.
        """
        if self._stale:
            self.recover(now)
        uow = UnitOfWork(self, now, absent)
        results: list[Result | None] = [None] * len(commands)
        routed = [self._route(c) for c in commands]
        for phase in Phase:
            for n, command in enumerate(commands):
                family, handler, when = routed[n]
                if when is phase:
                    results[n] = handler(uow.work(family), command)
            for work in list(uow.works.values()):
                work.end_phase(phase)
        decided = self._collect(uow, results)
        uow.commit()
        return decided

    def _route(self, command: Command) -> tuple[Family, Any, Phase]:
        try:
            return self._handlers[type(command)]
        except KeyError:
            raise TypeError(f"no family handles {type(command).__name__}") from None

    def _collect(self, uow: UnitOfWork, results: list[Result | None]) -> Decided:
        events: list[Any] = []
        snapshots: list[Any] = []
        opened: dict[UUID, str] = {}
        closed: list[UUID] = []
        for aggregate in uow.touched.values():
            new = aggregate.collect_events()
            events.extend(new)
            if new and _crossed_snapshot(new[0].originator_version, aggregate.version):
                snapshots.append(Aggregate.Snapshot.take(aggregate))
            is_open = self.family_of(aggregate).open_when.get(type(aggregate))
            if is_open is None:
                continue
            if is_open(aggregate):
                if aggregate.id not in self._open:
                    opened[aggregate.id] = type(aggregate).__name__
            elif aggregate.id in self._open:
                closed.append(aggregate.id)
        return Decided(
            results=[r if r is not None else Ok() for r in results],
            events=events,
            snapshots=snapshots,
            versions={a.id: a.version for a in uow.touched.values()},
            opened=opened,
            closed=closed,
        )

    def _commit(self, uow: UnitOfWork) -> None:
        for aggregate in uow.touched.values():
            self._states[self.family_of(aggregate).name].keep(aggregate)
            is_open = self.family_of(aggregate).open_when.get(type(aggregate))
            if is_open is not None:
                if is_open(aggregate):
                    self._open.add(aggregate.id)
                else:
                    self._open.discard(aggregate.id)
        for work in uow.works.values():
            work.commit()

    def invalidate(self) -> None:
        """The store refused a batch stored elsewhere: reload before the next one."""
        self._stale = True

    def store_decided(self, decided: Decided) -> None:
        """Store a decided batch; if the store refuses, reload before the next batch."""
        if not decided.events:
            return
        try:
            self.store.save(decided.events, decided.snapshots, decided.opened, decided.closed)
        except BaseException:
            self._stale = True
            raise


class UnitOfWork:
    """One batch: the aggregates it loaded and changed, and each family's part of it.

    Handlers of low-rate families load, decide and change aggregates here with
    :meth:`get` and :meth:`add`; hot families keep their open aggregates in their
    state and :meth:`add` what they change. Everything added is stored together.
    """

    def __init__(self, processor: CommandProcessor, now: datetime, absent: Collection[UUID] = ()):
        self.processor = processor
        self.now = now
        self.absent = absent
        self.ts = now.timestamp()
        self.touched: dict[UUID, Aggregate] = {}
        self.works: dict[str, BatchWork] = {}

    def work(self, family: Family) -> Any:
        """A family's part of this batch, begun on first use."""
        work = self.works.get(family.name)
        if work is None:
            work = self.works[family.name] = self.processor._states[family.name].begin(self)
        return work

    def state(self, kind: type[_S]) -> _S:
        return self.processor.state(kind)

    def get(self, uuid: UUID, kind: type[_A]) -> _A | None:
        """The aggregate as this batch has it: changed here, held in memory, or loaded."""
        aggregate = self.touched.get(uuid) or self.processor.held(uuid)
        if aggregate is None and uuid not in self.absent:
            aggregate = self.processor.load(uuid, kind)
        return aggregate if isinstance(aggregate, kind) else None

    def add(self, aggregate: Aggregate) -> None:
        """Store this aggregate's new events with the batch."""
        self.touched[aggregate.id] = aggregate

    def release(self, due: Any, reason: str) -> list[str]:
        """Every family takes back the work held by holders ``due`` says are gone."""
        released: list[str] = []
        for family in self.processor.families:
            if family.release is not None:
                released += family.release(self.work(family), due, reason)
        return released

    def offer(self, holder: str, n: int) -> list[Any]:
        """Up to ``n`` tasks for spot ``holder``, from every family that hands out work."""
        offered: list[Any] = []
        for family in self.processor.families:
            if family.offer is not None and len(offered) < n:
                offered += family.offer(self.work(family), holder, n - len(offered))
        return offered

    def commit(self) -> None:
        self.processor._commit(self)


def _owner(event_class: type) -> type | None:
    """The aggregate class an event class is nested in (``TaskBlock`` of ``TaskBlock.Claimed``)."""
    owner_name = event_class.__qualname__.rpartition(".")[0]
    owner = getattr(sys.modules[event_class.__module__], owner_name, None) if owner_name else None
    return owner if isinstance(owner, type) and issubclass(owner, Aggregate) else None


def _crossed_snapshot(first_new_version: int, version: int) -> bool:
    return version // SNAPSHOT_INTERVAL > (first_new_version - 1) // SNAPSHOT_INTERVAL


def _topic(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"
