"""The spots family's state: the spots that are UP, and when each was last heard from.

A spot that is DOWN is open work no more: it is loaded from the store when it
speaks again (a heartbeat brings it back UP) and kept among the recently used
until then.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from uuid import UUID, uuid4

from domain.family import Config, ConflictError, Loader, NotFoundError, Ok, Reaped, Recent, Result
from domain.ids import UnknownIdError, parse_spot_id
from domain.processor import UnitOfWork
from domain.spots.commands import (
    Claimed,
    ClaimTasks,
    Heartbeat,
    Hello,
    ReapSpots,
    SpotRegistered,
)
from domain.spots.spot import DOWN, UP, Spot


class LiveSpots:
    """Spots that are UP, in memory; the rest loaded on demand."""

    def __init__(self, config: Config):
        self.heartbeat_store_interval = config.heartbeat_store_interval
        self.spots: dict[UUID, Spot] = {}
        self.recent: Recent[UUID, Spot] = Recent(config.recent)
        #: When each spot in memory was last heard from (heartbeats are not all stored).
        self.last_seen: dict[UUID, float] = {}

    def recover(self, load: Loader, open_ids: Iterable[UUID], now: datetime) -> None:
        self.spots.clear()
        self.recent.clear()
        self.last_seen.clear()
        started = now.timestamp()
        for uuid in open_ids:
            spot = load(uuid, Spot)
            if spot is not None:
                self.spots[uuid] = spot
                # A spot heard from before the restart gets a full timeout from now.
                self.last_seen[uuid] = max(spot.last_heartbeat.timestamp(), started)

    def held(self, uuid: UUID) -> Spot | None:
        return self.spots.get(uuid) or self.recent.get(uuid)

    def find(self, text: str) -> Spot | None:
        """The spot named ``text`` if it is in memory."""
        uuid = _uuid_or_none(text)
        return self.held(uuid) if uuid is not None else None

    def ids(self) -> list[UUID]:
        """The spots in memory: every live one and the recently used others."""
        return [*self.spots, *(u for u in self.recent._items if u not in self.spots)]

    def keep(self, aggregate: object) -> None:
        assert isinstance(aggregate, Spot)
        if aggregate.status == UP:
            self.spots[aggregate.id] = aggregate
            self.recent.pop(aggregate.id)
        else:
            self.spots.pop(aggregate.id, None)
            self.last_seen.pop(aggregate.id, None)
            self.recent.put(aggregate.id, aggregate)

    def begin(self, uow: UnitOfWork) -> SpotsWork:
        return SpotsWork(self, uow)


class SpotsWork:
    """The spots' part of one batch."""

    def __init__(self, state: LiveSpots, uow: UnitOfWork):
        self.state = state
        self.uow = uow
        #: Spots heard from in this batch, and when.
        self.seen: dict[UUID, float] = {}

    def spot(self, text: str) -> Spot | None:
        """The spot named ``text``, as this batch has it."""
        uuid = _uuid_or_none(text)
        return self.uow.get(uuid, Spot) if uuid is not None else None

    def last_seen(self, holder: str, default: float) -> float:
        """When the spot ``holder`` was last heard from; ``default`` if never."""
        uuid = _uuid_or_none(holder)
        if uuid is None:
            return default
        return self.seen.get(uuid, self.state.last_seen.get(uuid, default))

    def hello(self, c: Hello) -> Result:
        spot = Spot.register(uuid4(), c.ip_address, self.uow.now)
        self.uow.add(spot)
        self.seen[spot.id] = self.uow.ts
        return SpotRegistered(spot.public_id)

    def heartbeat(self, c: Heartbeat) -> Result:
        spot = self.spot(c.spot_id)
        if spot is None:
            return NotFoundError("spot not found")
        now, ts = self.uow.now, self.uow.ts
        self.seen[spot.id] = ts
        last = spot.figures()
        given = (c.ip_address, c.cpu_load, c.running_tasks, c.total_cores)
        ip, cpu, running, cores = (
            g if g is not None else o for g, o in zip(given, last, strict=True)
        )
        figures = (str(ip), float(cpu), int(running), int(cores))  # type: ignore[arg-type, call-overload]
        due = ts - spot.last_heartbeat.timestamp() >= self.state.heartbeat_store_interval
        if spot.status == DOWN:
            spot.come_up(now)
            self.uow.add(spot)
        if spot.status == UP and (due or figures != spot.figures() or spot.pending_events):
            spot.record_heartbeat(*figures, at=now)
            self.uow.add(spot)
        return Ok()

    def claim(self, c: ClaimTasks) -> Result:
        spot = self.spot(c.spot_id)
        if spot is None:
            return NotFoundError("spot not found")
        if spot.status != UP:
            return ConflictError("spot is DOWN: send a heartbeat to bring it back UP")
        return Claimed(self.uow.offer(c.spot_id, c.max_tasks))

    def reap_spots(self, c: ReapSpots) -> Result:
        down: list[str] = []
        ts = self.uow.ts
        for uuid, spot in self.state.spots.items():
            seen = self.seen.get(uuid, self.state.last_seen.get(uuid, ts))
            if spot.status == UP and ts - seen > c.timeout:
                spot.mark_down(f"no heartbeat for {c.timeout:g}s", self.uow.now)
                self.uow.add(spot)
                down.append(spot.public_id)
        holders = set(down)
        tasks = self.uow.release(lambda holder, _: holder in holders, "spot down")
        return Reaped(spots=down, tasks=tasks)

    def end_phase(self, phase: object) -> None:
        pass

    def commit(self) -> None:
        for uuid, ts in self.seen.items():
            if uuid in self.state.spots:
                self.state.last_seen[uuid] = ts


def _uuid_or_none(text: str) -> UUID | None:
    try:
        return parse_spot_id(text)
    except UnknownIdError:
        return None
