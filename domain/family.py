"""What an aggregate family declares, and the contract of the command side.

A family (``domain/jobs/``, ``domain/spots/``...) is a package holding its
aggregates and their events, its commands with their handlers and results, its
errors, the in-memory state of its open work, and one :class:`Family` value
that declares all of it. :mod:`domain.registry` lists the families; everything
that must know every event or command (the Avro schemas, the relay's routing,
the projectors' subscriptions, the API's answers, the audit view) is derived
from those declarations.

Handlers run inside one batch of commands (:class:`~domain.processor.UnitOfWork`):
a family's :class:`FamilyState` lives as long as the writer and holds only its
open work; its :class:`BatchWork` lives for one batch and is what its handlers
are methods of.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import Transcoding
from eventsourcing.utils import register_topic

if TYPE_CHECKING:
    from domain.processor import UnitOfWork


class Phase(IntEnum):
    """When in a batch a command is decided.

    A task finished in a batch may be claimed again in the same batch, but a
    claim is never finished before it was answered: so creations and signs of
    life first, then what finishes or takes back work, then what hands it out.
    """

    BEGIN = 1
    FINISH = 2
    CLAIM = 3


# ---- the answers every family may give ------------------------------------------------


@dataclass(frozen=True)
class Ok:
    """Done; nothing more to say."""


@dataclass(frozen=True)
class Reaped:
    """Work taken back from holders that went away (and, for the spot reaper, which went)."""

    spots: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


class NotFoundError(LookupError):
    """The command names an entity that does not exist (404)."""


class ConflictError(RuntimeError):
    """The command cannot be applied in the entity's current state (409)."""


class StoreUnavailableError(RuntimeError):
    """The command was not stored: the store refused it or could not be reached in time (503).

    Raised by the writer that submits commands, not by a handler: part of the
    command side's contract with its callers.
    """


class OutcomeUnknownError(StoreUnavailableError):
    """The store did not confirm the batch in time: it may or may not have been stored (503)."""


#: A command is any frozen dataclass a family registers a handler for.
Command = Any
#: A result is a family's answer value, :class:`Ok`, or a domain error (returned, not raised).
Result = Any


class Loader(Protocol):
    """Loads an aggregate from the store; None when there is none of that kind."""

    def __call__(self, uuid: UUID, kind: type[Any]) -> Any: ...


class BatchWork(Protocol):
    """A family's part of one batch: its handlers are methods of it."""

    def end_phase(self, phase: Phase) -> None:
        """Every command of ``phase`` is decided: record what was gathered in it."""

    def commit(self) -> None:
        """The store accepted the batch: fold it into the family's state."""


class FamilyState(Protocol):
    """A family's open work, in memory for as long as the writer runs."""

    def recover(self, load: Loader, open_ids: Iterable[UUID], now: datetime) -> None:
        """Forget everything, then load the family's open aggregates ``open_ids``."""

    def begin(self, uow: UnitOfWork) -> BatchWork:
        """This family's part of a new batch."""

    def held(self, uuid: UUID) -> Aggregate | None:
        """The aggregate if it is in memory (open, or recently used)."""

    def keep(self, aggregate: Aggregate) -> None:
        """An aggregate the store just accepted changes to: hold it if still wanted."""


#: Given a holder and when its work was claimed, whether to take the work back.
HolderDue = Callable[[str, float], bool]


@dataclass(frozen=True)
class Family:
    """One aggregate family's declarations.

    Attributes:
        name: The family's name, e.g. ``"jobs"``.
        events: Every event class the family stores.
        topic: The topic catalogue's name for the topic its events go to.
        topics: Event class → another topic for it than ``topic`` (an agent's
            performance figures go to ``performance_metrics``).
        handlers: Command class → handler, a method of the family's :class:`BatchWork`.
        phases: Command class → its :class:`Phase` (default :attr:`Phase.BEGIN`).
        results: Every result class its handlers return (the API must answer each).
        state: Builds the family's :class:`FamilyState` from the processor's config.
        open_when: Aggregate class → whether one is open work. Open aggregates are
            listed in the store's index of open work, which start-up reads instead of
            history; an aggregate class not listed here is never indexed (it is
            loaded on demand).
        audit: Public entity name (``"job"``) → ``(public id, source) -> events or None``.
        offer: Hands claimable work to a spot that claims (see the attribute).
        release: Takes back the work held by holders ``due`` says are gone (a spot
            went down, a lease expired); the ids of the work taken back.
        legacy_topics: Topics this family's classes were stored under before they
            moved, so stores written by an older version still load.
        reads: Command class → the ids of the aggregates its handler may load from
            the store. The writer asks the store which of those it does not hold
            in memory exist, without blocking, before the batch is decided; a
            handler then finds one that does not exist absent at once instead of
            reading the store on the event loop (a new run's idempotency check).
        transcodings: How the store encodes the objects its aggregates hold that are
            not plain values (for their snapshots).
    """

    name: str
    events: tuple[type, ...]
    topic: str
    handlers: Mapping[type, Callable[[Any, Any], Result]]
    state: Callable[[Config], FamilyState]
    results: tuple[type, ...] = ()
    phases: Mapping[type, Phase] = field(default_factory=dict)
    open_when: Mapping[type, Callable[[Any], bool]] = field(default_factory=dict)
    audit: Mapping[str, Callable[[str, Any], list[dict[str, Any]] | None]] = field(
        default_factory=dict
    )
    release: Callable[[Any, HolderDue, str], list[str]] | None = None
    #: Hands up to ``n`` of its claimable tasks to spot ``holder`` (a claim), in the
    #: order families are registered: ``(work, holder, n) -> [ClaimedTask]``.
    offer: Callable[[Any, str, int], list[Any]] | None = None
    #: How many tasks a claim could take from it now, counted up to a limit:
    #: ``(state, now as a timestamp, limit) -> int``; the writer wakes that many
    #: waiting claims. A family that offers work declares it.
    claimable: Callable[[Any, float, int], int] | None = None
    legacy_topics: Mapping[str, type] = field(default_factory=dict)
    reads: Mapping[type, Callable[[Any], Iterable[UUID]]] = field(default_factory=dict)
    transcodings: tuple[Transcoding, ...] = ()
    topics: Mapping[type, str] = field(default_factory=dict)

    def topic_of(self, event_class: type) -> str:
        """The catalogue's name of the topic events of ``event_class`` go to."""
        return self.topics.get(event_class, self.topic)

    def __post_init__(self) -> None:
        for old, cls in self.legacy_topics.items():
            register_topic(old, cls)


@dataclass(frozen=True)
class Config:
    """What the families' states are configured with."""

    max_attempts: int = 3
    heartbeat_store_interval: float = 5.0
    #: How many closed aggregates a family keeps in memory after last use.
    recent: int = 1024
    #: Seconds a workflow task's lease lasts unless renewed.
    lease_seconds: float = 30.0


_K = TypeVar("_K")
_V = TypeVar("_V")


class Recent(Generic[_K, _V]):
    """The ``size`` values last put or got, the oldest forgotten first.

    What a family state keeps of closed work it just used (a late report on a
    finished task, a retried job creation), so that memory stays bounded by the
    open work however long the writer runs.
    """

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[_K, _V] = OrderedDict()

    def get(self, key: _K) -> _V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: _K, value: _V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def pop(self, key: _K) -> _V | None:
        return self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items
