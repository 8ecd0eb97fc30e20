"""The command side: decide a batch of commands, then store it in one transaction.

One :class:`CommandProcessor` is the single writer of every job, task block and
spot in a deployment. It keeps the open aggregates in memory (so deciding needs
no reads) and groups the commands of concurrent requests into one batch: all the
claims a batch makes on a block are one stored event, and so are its
completions, failures and reaps. A batch is decided in phases, so that a task
finished in a batch may be claimed again in the same batch but a claim is never
finished before it was answered:

1. new jobs and spots; heartbeats (a DOWN spot comes back UP);
2. completes, fails and reaps;
3. claims.

If the store refuses the batch, nothing of it was stored and every caller is
told so; the processor then reloads its state from the store before the next.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeAlias, TypeVar
from uuid import UUID, uuid4

from eventsourcing.domain import Aggregate

from domain.ids import (
    TaskRef,
    UnknownIdError,
    block_id,
    job_for_key,
    parse_spot_id,
    parse_task_id,
    task_id,
)
from domain.jobs import Job
from domain.spots import DOWN, UP, Spot
from domain.sweeps import Sweep, parse
from domain.tasks import RUNNING, BlockBatch, Completion, Outcome, TaskBlock

log = logging.getLogger(__name__)

BLOCK_SIZE = 500

_A = TypeVar("_A", bound=Aggregate)


class EventStore(Protocol):
    """What the processor needs of the event store."""

    def load(self, uuid: UUID) -> Aggregate | None: ...

    def save(self, events: Sequence[Any], snapshots: Sequence[Any]) -> None:
        """Append ``events`` atomically (optimistic concurrency per aggregate version)."""
        ...

    def ids_of(self, topics: Sequence[str]) -> list[UUID]:
        """Ids of the aggregates whose stored events include one of ``topics``."""
        ...


# ---- commands --------------------------------------------------------------------


@dataclass(frozen=True)
class CreateJob:
    sweep: Sweep
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Hello:
    ip_address: str


@dataclass(frozen=True)
class Heartbeat:
    """A spot's sign of life; a figure left out keeps its last reported value."""

    spot_id: str
    ip_address: str | None = None
    cpu_load: float | None = None
    running_tasks: int | None = None
    total_cores: int | None = None


@dataclass(frozen=True)
class ClaimTasks:
    spot_id: str
    max_tasks: int


@dataclass(frozen=True)
class CompleteTask:
    task_id: str
    spot_id: str
    fence: int | None
    runtime_ms: int | None
    iter: int | None
    fopt: float | None
    result_json: str | None


@dataclass(frozen=True)
class FailTask:
    task_id: str
    spot_id: str
    fence: int | None
    error: str
    retriable: bool


@dataclass(frozen=True)
class ReapSpots:
    """SpotReaper: spots silent for longer than ``timeout`` seconds go DOWN."""

    timeout: float


@dataclass(frozen=True)
class ReapTasks:
    """TaskReaper: RUNNING tasks whose holder was silent for ``threshold`` seconds."""

    threshold: float


@dataclass(frozen=True)
class ReleaseClaims:
    """Undo claims whose answer never reached their spot, if they were stored.

    The writer issues it after a batch whose append failed without saying whether
    it was stored (the connection lost after the commit): each ``(task id, spot,
    fence)`` still RUNNING under that spot with that fence goes back to NEW (or
    FAILED, its attempts used), as a reap. A claim that was not stored changes
    nothing.
    """

    claims: tuple[tuple[str, str, int], ...]
    reason: str = "claim answer lost"


Command: TypeAlias = (
    CreateJob
    | Hello
    | Heartbeat
    | ClaimTasks
    | CompleteTask
    | FailTask
    | ReapSpots
    | ReapTasks
    | ReleaseClaims
)


# ---- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class JobCreated:
    job_id: str
    total_tasks: int
    replayed: bool


@dataclass(frozen=True)
class SpotRegistered:
    spot_id: str


@dataclass(frozen=True)
class ClaimedTask:
    task_id: str
    payload: str
    fence: int


@dataclass(frozen=True)
class Claimed:
    tasks: list[ClaimedTask]


@dataclass(frozen=True)
class Finished:
    """Answer to complete or fail: the outcome, and for fail whether it retries."""

    outcome: Outcome
    will_retry: bool = False


@dataclass(frozen=True)
class Reaped:
    spots: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Ok:
    pass


class NotFoundError(LookupError):
    """The command names a job, task or spot that does not exist (404)."""


class ConflictError(RuntimeError):
    """The command cannot be applied in the entity's current state (409/422)."""


class StoreUnavailableError(RuntimeError):
    """The command was not stored: the store refused it or could not be reached in time (503).

    Raised by the writer that submits commands, not by a handler: part of the
    command side's contract with its callers.
    """


class OutcomeUnknownError(StoreUnavailableError):
    """The store did not confirm the batch in time: it may or may not have been stored (503)."""


Result: TypeAlias = (
    JobCreated | SpotRegistered | Claimed | Finished | Reaped | Ok | NotFoundError | ConflictError
)


class CommandProcessor:
    """Single writer of jobs, task blocks and spots (see the module docstring)."""

    def __init__(self, store: EventStore, max_attempts: int, heartbeat_store_interval: float):
        self.store = store
        self.max_attempts = max_attempts
        self.heartbeat_store_interval = heartbeat_store_interval
        self.jobs: dict[UUID, Job] = {}
        self.blocks: dict[UUID, TaskBlock] = {}
        self.spots: dict[UUID, Spot] = {}
        self.last_seen: dict[UUID, float] = {}
        self._claimable: dict[UUID, None] = {}
        self._stale = True

    # ---- state -------------------------------------------------------------------

    @property
    def needs_recovery(self) -> bool:
        """True when the in-memory state must be reloaded from the store first."""
        return self._stale

    def recover(self, now: datetime) -> None:
        """Load every spot and every unfinished block from the store."""
        self.jobs.clear()
        self.blocks.clear()
        self.spots.clear()
        self._claimable.clear()
        started = now.timestamp()
        for uuid in self.store.ids_of([_topic(Spot.Registered)]):
            spot = self._load(uuid, Spot)
            if spot is not None:
                self.spots[uuid] = spot
                # A spot heard from before the restart gets a full timeout from now.
                self.last_seen[uuid] = max(spot.last_heartbeat.timestamp(), started)
        for uuid in self.store.ids_of([_topic(Job.Created)]):
            job = self._load(uuid, Job)
            if job is None:
                continue
            self.jobs[uuid] = job
            for block_uuid in job.block_ids():
                block = self._load(block_uuid, TaskBlock)
                if block is not None and not block.is_finished():
                    self._keep_block(block)
        self._stale = False

    def _load(self, uuid: UUID, kind: type[_A]) -> _A | None:
        aggregate = self.store.load(uuid)
        return aggregate if isinstance(aggregate, kind) else None

    def _keep_block(self, block: TaskBlock) -> None:
        self.blocks[block.id] = block
        if block.new_count():
            self._claimable[block.id] = None

    def job(self, uuid: UUID) -> Job | None:
        job = self.jobs.get(uuid)
        if job is None:
            job = self._load(uuid, Job)
            if job is not None:
                self.jobs[uuid] = job
        return job

    def block(self, job: Job, number: int) -> TaskBlock | None:
        uuid = block_id(job.id, number)
        block = self.blocks.get(uuid)
        if block is None:
            block = self._load(uuid, TaskBlock)
            if block is not None:
                self._keep_block(block)
        return block

    def spot(self, text: str) -> Spot | None:
        try:
            uuid = parse_spot_id(text)
        except UnknownIdError:
            return None
        spot = self.spots.get(uuid)
        if spot is None:
            spot = self._load(uuid, Spot)
            if spot is not None:
                self.spots[uuid] = spot
        return spot

    def versions(self, uuids: Iterable[UUID]) -> dict[UUID, int]:
        """The versions the writer has stored of these aggregates (for read-your-writes)."""
        known: dict[UUID, Aggregate] = {**self.jobs, **self.blocks, **self.spots}
        return {u: known[u].version for u in uuids if u in known}

    # ---- one batch -----------------------------------------------------------------

    def process(self, commands: Sequence[Command], now: datetime) -> list[Result]:
        """Decide every command, store the batch atomically, return one result each.

        Raises whatever the store raised if it refused the batch; then nothing was
        stored and the processor reloads before its next batch.
        """
        decided = self.decide(commands, now)
        self.store_decided(decided)
        return decided.results

    def decide(self, commands: Sequence[Command], now: datetime) -> Decided:
        """Decide a batch against the state so far.

        The batch's events are taken out of the aggregates here; :meth:`store_decided`
        appends them.
        """
        if self._stale:
            self.recover(now)
        batch = _Batch(self, now)
        results: list[Result | None] = [None] * len(commands)
        phases: tuple[tuple[type, ...], ...] = (
            (CreateJob, Hello, Heartbeat),
            (CompleteTask, FailTask, ReapSpots, ReapTasks, ReleaseClaims),
            (ClaimTasks,),
        )
        for kinds in phases:
            for n, command in enumerate(commands):
                if isinstance(command, kinds):
                    results[n] = batch.decide(command)
            if kinds[0] is CompleteTask:
                batch.record_finishes()
        batch.record_claims()
        events: list[Any] = []
        snapshots: list[Any] = []
        for aggregate in batch.touched.values():
            new = aggregate.collect_events()
            events.extend(new)
            if new and _crossed_snapshot(new[0].originator_version, aggregate.version):
                snapshots.append(Aggregate.Snapshot.take(aggregate))
        batch.commit()
        return Decided(
            results=[r if r is not None else Ok() for r in results],
            events=events,
            snapshots=snapshots,
            versions={a.id: a.version for a in batch.touched.values()},
        )

    def invalidate(self) -> None:
        """The store refused a batch stored elsewhere: reload before the next one."""
        self._stale = True

    def store_decided(self, decided: Decided) -> None:
        """Store a decided batch; if the store refuses, reload before the next batch."""
        if not decided.events:
            return
        try:
            self.store.save(decided.events, decided.snapshots)
        except BaseException:
            self._stale = True
            raise


SNAPSHOT_INTERVAL = 100


def _crossed_snapshot(first_new_version: int, version: int) -> bool:
    return version // SNAPSHOT_INTERVAL > (first_new_version - 1) // SNAPSHOT_INTERVAL


@dataclass
class Decided:
    """A decided batch: the answers, and what must be stored before they are sent."""

    results: list[Result]
    events: list[Any]
    snapshots: list[Any]
    versions: dict[UUID, int]


class _Batch:
    """Working state of one batch: which aggregates it touched and how."""

    def __init__(self, processor: CommandProcessor, now: datetime):
        self.p = processor
        self.now = now
        self.ts = now.timestamp()
        self.touched: dict[UUID, Aggregate] = {}
        self.finishing: dict[UUID, BlockBatch] = {}
        self.claims: dict[UUID, tuple[list[int], list[str]]] = {}
        self.picked: dict[UUID, set[int]] = {}
        self.new_blocks: list[TaskBlock] = []
        self.seen: dict[UUID, float] = {}

    def decide(self, command: Command) -> Result:
        match command:
            case CreateJob():
                return self.create_job(command)
            case Hello():
                return self.hello(command)
            case Heartbeat():
                return self.heartbeat(command)
            case CompleteTask():
                return self.complete(command)
            case FailTask():
                return self.fail(command)
            case ReapSpots():
                return self.reap_spots(command)
            case ReapTasks():
                return self.reap_tasks(command)
            case ReleaseClaims():
                return self.release_claims(command)
            case ClaimTasks():
                return self.claim(command)

    def _spot(self, text: str) -> Spot | None:
        """A spot this batch already touched, else the processor's."""
        uuid = _uuid_or_none(text)
        touched = self.touched.get(uuid) if uuid is not None else None
        return touched if isinstance(touched, Spot) else self.p.spot(text)

    def touch(self, aggregate: Aggregate) -> None:
        self.touched[aggregate.id] = aggregate

    # ---- jobs and spots --------------------------------------------------------------

    def create_job(self, c: CreateJob) -> Result:
        sweep_text = c.sweep.to_json()
        uuid = job_for_key(c.idempotency_key) if c.idempotency_key else uuid4()
        existing = self.touched.get(uuid) or (self.p.job(uuid) if c.idempotency_key else None)
        if isinstance(existing, Job):
            if existing.sweep != sweep_text:
                return ConflictError("Idempotency-Key was used before with a different job")
            return JobCreated(existing.public_id, existing.total_tasks, replayed=True)
        job = Job.create(
            uuid,
            sweep_text,
            c.sweep.total_tasks,
            BLOCK_SIZE,
            self.p.max_attempts,
            c.idempotency_key,
        )
        self.touch(job)
        for number, block_uuid in enumerate(job.block_ids()):
            first, count = job.block_range(number)
            block = TaskBlock.create(block_uuid, job.public_id, first, count, job.max_attempts)
            self.touch(block)
            self.new_blocks.append(block)
        return JobCreated(job.public_id, job.total_tasks, replayed=False)

    def hello(self, c: Hello) -> Result:
        spot = Spot.register(uuid4(), c.ip_address, self.now)
        self.touch(spot)
        self.seen[spot.id] = self.ts
        return SpotRegistered(spot.public_id)

    def heartbeat(self, c: Heartbeat) -> Result:
        spot = self._spot(c.spot_id)
        if spot is None:
            return NotFoundError("spot not found")
        self.seen[spot.id] = self.ts
        last = spot.figures()
        given = (c.ip_address, c.cpu_load, c.running_tasks, c.total_cores)
        ip, cpu, running, cores = (
            g if g is not None else o for g, o in zip(given, last, strict=True)
        )
        figures = (str(ip), float(cpu), int(running), int(cores))  # type: ignore[arg-type, call-overload]
        due = self.ts - spot.last_heartbeat.timestamp() >= self.p.heartbeat_store_interval
        if spot.status == DOWN:
            spot.come_up(self.now)
            self.touch(spot)
        if spot.status == UP and (due or figures != spot.figures() or spot.pending_events):
            spot.record_heartbeat(*figures, at=self.now)
            self.touch(spot)
        return Ok()

    # ---- finishing ---------------------------------------------------------------------

    def _task(self, text: str) -> tuple[TaskRef, BlockBatch] | None:
        try:
            ref = parse_task_id(text)
        except UnknownIdError:
            return None
        job = self.p.job(ref.job)
        if job is None or ref.index >= job.total_tasks:
            return None
        block = self.p.block(job, ref.index // job.block_size)
        if block is None:
            return None
        return ref, self._finishing(block)

    def _finishing(self, block: TaskBlock) -> BlockBatch:
        batch = self.finishing.get(block.id)
        if batch is None:
            batch = self.finishing[block.id] = BlockBatch(block)
        return batch

    def complete(self, c: CompleteTask) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        ref, batch = found
        completion = Completion(ref.index, c.spot_id, c.runtime_ms, c.iter, c.fopt, c.result_json)
        return Finished(batch.complete(completion, c.fence))

    def fail(self, c: FailTask) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        ref, batch = found
        outcome, retried = batch.fail(ref.index, c.spot_id, c.fence, c.error, c.retriable)
        return Finished(outcome, will_retry=retried)

    def reap_spots(self, c: ReapSpots) -> Result:
        down: list[str] = []
        for uuid, spot in self.p.spots.items():
            seen = self.seen.get(uuid, self.p.last_seen.get(uuid, self.ts))
            if spot.status == UP and self.ts - seen > c.timeout:
                spot.mark_down(f"no heartbeat for {c.timeout:g}s", self.now)
                self.touch(spot)
                down.append(spot.public_id)
        holders = set(down)
        tasks = self._reap(lambda holder, _: holder in holders, "spot down")
        return Reaped(spots=down, tasks=tasks)

    def reap_tasks(self, c: ReapTasks) -> Result:
        def expired(holder: str, claimed_at: float) -> bool:
            uuid = _uuid_or_none(holder)
            seen = self.seen.get(uuid, self.p.last_seen.get(uuid, 0.0)) if uuid else 0.0
            return self.ts - max(claimed_at, seen) > c.threshold

        return Reaped(tasks=self._reap(expired, "lease expired"))

    def release_claims(self, c: ReleaseClaims) -> Result:
        released: list[str] = []
        for task_text, holder, fence in c.claims:
            found = self._task(task_text)
            if found is None:
                continue
            ref, batch = found
            task = batch.view(ref.index)
            if (
                task.status == RUNNING
                and task.holder == holder
                and task.fence == fence
                and batch.reap(ref.index, c.reason) is not None
            ):
                released.append(task_text)
        return Reaped(tasks=released)

    def _reap(self, due: Callable[[str, float], bool], reason: str) -> list[str]:
        reaped: list[str] = []
        for block in list(self.p.blocks.values()):
            for index, task in block.running():
                if (
                    task.holder is not None
                    and due(task.holder, task.claimed_at or 0.0)
                    and self._finishing(block).reap(index, reason) is not None
                ):
                    reaped.append(task_id(_job_uuid(block), index))
        return reaped

    def record_finishes(self) -> None:
        for batch in self.finishing.values():
            if batch.completions or batch.failures or batch.reaps:
                batch.record(self.now)
                self.touch(batch.block)
                if batch.block.new_count():
                    self.p._claimable[batch.block.id] = None

    # ---- claims --------------------------------------------------------------------------

    def claim(self, c: ClaimTasks) -> Result:
        spot = self._spot(c.spot_id)
        if spot is None:
            return NotFoundError("spot not found")
        if spot.status != UP:
            return ConflictError("spot is DOWN: send a heartbeat to bring it back UP")
        claimed: list[ClaimedTask] = []
        for block in self._claimable_blocks():
            picked = self.picked.setdefault(block.id, set())
            indexes = block.new_indexes(c.max_tasks - len(claimed), picked)
            if not indexes:
                continue
            picked.update(indexes)
            pending = self.claims.setdefault(block.id, ([], []))
            pending[0].extend(indexes)
            pending[1].extend([c.spot_id] * len(indexes))
            job = self._job_of(block)
            sweep = parse(job.sweep)
            fences = {i: block.view(i).fence + 1 for i in indexes}
            claimed.extend(
                ClaimedTask(task_id(job.id, i), sweep.payload(i), fences[i]) for i in indexes
            )
            if len(claimed) == c.max_tasks:
                break
        return Claimed(claimed)

    def _job_of(self, block: TaskBlock) -> Job:
        """The block's job: its sweep gives the tasks' payloads."""
        uuid = _job_uuid(block)
        job = self.touched.get(uuid) or self.p.job(uuid)  # a job of this batch is not kept yet
        if not isinstance(job, Job):
            raise LookupError(f"block {block.id} names job {block.job_id}, which is not stored")
        return job

    def _claimable_blocks(self) -> Iterable[TaskBlock]:
        yield from self.new_blocks
        for uuid in list(self.p._claimable):
            kept = self.p.blocks.get(uuid)
            if kept is None or not kept.new_count():
                self.p._claimable.pop(uuid, None)
                continue
            yield kept

    def record_claims(self) -> None:
        for uuid, (indexes, holders) in self.claims.items():
            block = self.touched.get(uuid) or self.p.blocks[uuid]
            assert isinstance(block, TaskBlock)
            block.claim(indexes, holders, self.now)
            self.touch(block)

    # ---- after the store accepted the batch ------------------------------------------

    def commit(self) -> None:
        for aggregate in self.touched.values():
            if isinstance(aggregate, Job):
                self.p.jobs[aggregate.id] = aggregate
            elif isinstance(aggregate, Spot):
                self.p.spots[aggregate.id] = aggregate
            elif isinstance(aggregate, TaskBlock):
                if aggregate.is_finished():
                    self.p.blocks.pop(aggregate.id, None)
                    self.p._claimable.pop(aggregate.id, None)
                else:
                    self.p._keep_block(aggregate)
        self.p.last_seen.update(self.seen)


def _uuid_or_none(text: str) -> UUID | None:
    try:
        return parse_spot_id(text)
    except UnknownIdError:
        return None


def _job_uuid(block: TaskBlock) -> UUID:
    return UUID(hex=block.job_id.removeprefix("job-"))


def _topic(event_class: type) -> str:
    return f"{event_class.__module__}:{event_class.__qualname__}"
