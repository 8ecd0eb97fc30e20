"""Task blocks: one aggregate owns a contiguous block of a job's tasks.

Why blocks: a stored event per task state change caps the store at a few
thousand changes a second (DESIGN.md), so the claims, completions, failures and
reaps that one batch of commands makes on a block are stored as one event each,
listing the tasks they touch. The invariants still hold per task:

* a task is RUNNING under at most one holder (a claim needs the task NEW);
* every claim gives the task a fencing token one higher than its last;
* only the holder, with the current token, may complete or fail it;
* a task is claimed at most ``max_attempts`` times before it is FAILED.

A block does not carry the sweep: its tasks' parameters are the job's (stored
once, in ``Job.Created``), found by ``job_id``. And no event a block stores
grows past :attr:`BlockBatch.MAX_EVENT_BYTES` of texts (results, errors), well
under the broker's 1 MB message size: a batch's finishes are split into as many
events as that takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

NEW, RUNNING, DONE, FAILED = "NEW", "RUNNING", "DONE", "FAILED"
TERMINAL = frozenset({DONE, FAILED})


class TaskBlockError(RuntimeError):
    """A change that would break a task invariant; the writer never asks for one."""


class Outcome(StrEnum):
    """What a complete or fail command does to one task."""

    ACCEPTED = "accepted"
    ALREADY_COMPLETED = "already completed"
    ALREADY_TERMINAL = "already terminal"
    NOT_ASSIGNED = "task not assigned to this spot"
    STALE_FENCE = "stale fencing token"


@dataclass(frozen=True)
class TaskView:
    """One task's state as the writer sees it."""

    status: str
    holder: str | None
    fence: int
    attempts: int
    claimed_at: float | None


@dataclass(frozen=True)
class Completion:
    index: int
    holder: str
    runtime_ms: int | None
    iter: int | None
    fopt: float | None
    result_json: str | None

    @property
    def size(self) -> int:
        return _ITEM_BYTES + _utf8(self.holder) + _utf8(self.result_json or "")


@dataclass(frozen=True)
class Failure:
    index: int
    holder: str
    error: str
    retried: bool

    @property
    def size(self) -> int:
        return _ITEM_BYTES + _utf8(self.holder) + _utf8(self.error)


@dataclass(frozen=True)
class Reap:
    index: int
    holder: str
    retried: bool

    @property
    def size(self) -> int:
        return _ITEM_BYTES + _utf8(self.holder)


#: What an item's numbers and Avro framing take at most, beside its texts.
_ITEM_BYTES = 64


def _utf8(text: str) -> int:
    return len(text.encode())


def decide_complete(task: TaskView, spot: str, fence: int | None) -> Outcome:
    if task.status == DONE:
        return Outcome.ALREADY_COMPLETED
    if task.status == FAILED:
        return Outcome.ALREADY_TERMINAL
    return _decide_holder(task, spot, fence)


def decide_fail(task: TaskView, spot: str, fence: int | None) -> Outcome:
    if task.status in TERMINAL:
        return Outcome.ALREADY_TERMINAL
    return _decide_holder(task, spot, fence)


def _decide_holder(task: TaskView, spot: str, fence: int | None) -> Outcome:
    if task.status != RUNNING or task.holder != spot:
        return Outcome.NOT_ASSIGNED
    if fence is not None and fence != task.fence:
        return Outcome.STALE_FENCE
    return Outcome.ACCEPTED


class TaskBlock(Aggregate):
    """Tasks ``first .. first + count - 1`` of one job."""

    class Created(Aggregate.Created):
        job_id: str
        first: int
        count: int
        max_attempts: int

    def __init__(self, job_id: str, first: int, count: int, max_attempts: int):
        self.job_id = job_id
        self.first = first
        self.count = count
        self.max_attempts = max_attempts
        self.status = [NEW] * count
        self.attempts = [0] * count
        self.fences = [0] * count
        self.holders: list[str | None] = [None] * count
        self.claimed_at: list[float | None] = [None] * count
        #: How many tasks are NEW, and the lowest offset that may be NEW.
        self.new = count
        self.new_from = 0
        #: How many tasks are not yet DONE or FAILED.
        self.open = count

    @classmethod
    def create(
        cls, block_id: UUID, job_id: str, first: int, count: int, max_attempts: int
    ) -> TaskBlock:
        if count <= 0 or first < 0 or max_attempts <= 0:
            raise TaskBlockError("a block needs tasks, a first index and attempts")
        return cls._create(
            cls.Created,
            id=block_id,
            job_id=job_id,
            first=first,
            count=count,
            max_attempts=max_attempts,
        )

    # ---- queries -------------------------------------------------------------

    def holds(self, index: int) -> bool:
        return self.first <= index < self.first + self.count

    def view(self, index: int) -> TaskView:
        if not self.holds(index):
            raise TaskBlockError(f"task {index} is not in this block")
        o = index - self.first
        return TaskView(
            self.status[o], self.holders[o], self.fences[o], self.attempts[o], self.claimed_at[o]
        )

    def new_count(self) -> int:
        return self.new

    def is_finished(self) -> bool:
        return self.open == 0

    def new_indexes(self, limit: int, skip: set[int]) -> list[int]:
        picked: list[int] = []
        status = self.status
        for o in range(self.new_from, self.count):
            if status[o] == NEW and self.first + o not in skip:
                picked.append(self.first + o)
                if len(picked) == limit:
                    break
        return picked

    def running(self) -> list[tuple[int, TaskView]]:
        return [
            (self.first + o, self.view(self.first + o))
            for o, s in enumerate(self.status)
            if s == RUNNING
        ]

    def retries_left(self, index: int) -> bool:
        return self.attempts[index - self.first] < self.max_attempts

    # ---- commands: each stores one event for many tasks ------------------------

    def claim(self, indexes: list[int], holders: list[str], at: datetime) -> None:
        if len(holders) != len(indexes) or len(set(indexes)) != len(indexes):
            raise TaskBlockError("a claim names each task once, with one holder each")
        for index in indexes:
            if self.view(index).status != NEW:
                raise TaskBlockError(f"task {index} is not NEW, so it cannot be claimed")
        fences = [self.fences[i - self.first] + 1 for i in indexes]
        attempts = [self.attempts[i - self.first] + 1 for i in indexes]
        self.trigger_event(
            self.Claimed,
            job_id=self.job_id,
            indexes=indexes,
            holders=holders,
            fences=fences,
            attempts=attempts,
            at=at,
        )

    class Claimed(Aggregate.Event):
        job_id: str
        indexes: list[int]
        holders: list[str]
        fences: list[int]
        attempts: list[int]
        at: datetime

        def apply(self, block: TaskBlock) -> None:
            at = self.at.timestamp()
            for index, holder, fence, attempt in zip(
                self.indexes, self.holders, self.fences, self.attempts, strict=True
            ):
                o = index - block.first
                block.status[o] = RUNNING
                block.holders[o] = holder
                block.fences[o] = fence
                block.attempts[o] = attempt
                block.claimed_at[o] = at
            block.new -= len(self.indexes)
            while block.new_from < block.count and block.status[block.new_from] != NEW:
                block.new_from += 1

    def complete(self, items: list[Completion], at: datetime) -> None:
        self._check_held([(c.index, c.holder) for c in items])
        self.trigger_event(
            self.Completed,
            job_id=self.job_id,
            indexes=[c.index for c in items],
            holders=[c.holder for c in items],
            runtime_ms=[c.runtime_ms for c in items],
            iters=[c.iter for c in items],
            fopts=[c.fopt for c in items],
            results=[c.result_json for c in items],
            at=at,
        )

    class Completed(Aggregate.Event):
        job_id: str
        indexes: list[int]
        holders: list[str]
        runtime_ms: list[int | None]
        iters: list[int | None]
        fopts: list[float | None]
        results: list[str | None]
        at: datetime

        def apply(self, block: TaskBlock) -> None:
            for index in self.indexes:
                block._finish(index, DONE)

    def fail(self, items: list[Failure], at: datetime) -> None:
        self._check_held([(f.index, f.holder) for f in items])
        self._check_retries([(f.index, f.retried) for f in items])
        self.trigger_event(
            self.Failed,
            job_id=self.job_id,
            indexes=[f.index for f in items],
            holders=[f.holder for f in items],
            errors=[f.error for f in items],
            retried=[f.retried for f in items],
            at=at,
        )

    class Failed(Aggregate.Event):
        job_id: str
        indexes: list[int]
        holders: list[str]
        errors: list[str]
        retried: list[bool]
        at: datetime

        def apply(self, block: TaskBlock) -> None:
            for index, retried in zip(self.indexes, self.retried, strict=True):
                block._finish(index, NEW if retried else FAILED)

    def reap(self, items: list[Reap], reason: str, at: datetime) -> None:
        self._check_held([(r.index, r.holder) for r in items])
        self._check_retries([(r.index, r.retried) for r in items])
        self.trigger_event(
            self.Reaped,
            job_id=self.job_id,
            indexes=[r.index for r in items],
            holders=[r.holder for r in items],
            retried=[r.retried for r in items],
            reason=reason,
            at=at,
        )

    class Reaped(Aggregate.Event):
        job_id: str
        indexes: list[int]
        holders: list[str]
        retried: list[bool]
        reason: str
        at: datetime

        def apply(self, block: TaskBlock) -> None:
            for index, retried in zip(self.indexes, self.retried, strict=True):
                block._finish(index, NEW if retried else FAILED)

    def _finish(self, index: int, status: str) -> None:
        o = index - self.first
        self.status[o] = status
        self.holders[o] = None
        self.claimed_at[o] = None
        if status == NEW:
            self.new += 1
            self.new_from = min(self.new_from, o)
        else:
            self.open -= 1

    def _check_held(self, pairs: list[tuple[int, str]]) -> None:
        for index, holder in pairs:
            task = self.view(index)
            if task.status != RUNNING or task.holder != holder:
                raise TaskBlockError(f"task {index} is not RUNNING under {holder}")
        if len({i for i, _ in pairs}) != len(pairs):
            raise TaskBlockError("a task appears twice in one change")

    def _check_retries(self, pairs: list[tuple[int, bool]]) -> None:
        for index, retried in pairs:
            if retried and not self.retries_left(index):
                raise TaskBlockError(f"task {index} has used all its attempts")


class BlockBatch:
    """The finishing changes one batch of commands makes to one block.

    Decisions see the block as stored plus the changes already accepted in this
    batch, so a duplicate in the same batch gets the answer a later retry would.
    :meth:`record` then stores one event per kind of change, or several when
    their texts would make one larger than :attr:`MAX_EVENT_BYTES`.
    """

    MAX_EVENT_BYTES = 256 * 1024

    def __init__(self, block: TaskBlock):
        self.block = block
        self._changed: dict[int, str] = {}
        self.completions: list[Completion] = []
        self.failures: list[Failure] = []
        self.reaps: dict[str, list[Reap]] = {}

    def view(self, index: int) -> TaskView:
        """The task as the store has it, with the changes this batch already accepted."""
        task = self.block.view(index)
        status = self._changed.get(index)
        if status is None:
            return task
        return TaskView(status, None, task.fence, task.attempts, None)

    def complete(self, c: Completion, fence: int | None) -> Outcome:
        outcome = decide_complete(self.view(c.index), c.holder, fence)
        if outcome is Outcome.ACCEPTED:
            self._changed[c.index] = DONE
            self.completions.append(c)
        return outcome

    def fail(
        self, index: int, spot: str, fence: int | None, error: str, retriable: bool
    ) -> tuple[Outcome, bool]:
        outcome = decide_fail(self.view(index), spot, fence)
        if outcome is not Outcome.ACCEPTED:
            return outcome, False
        retried = retriable and self.block.retries_left(index)
        self._changed[index] = NEW if retried else FAILED
        self.failures.append(Failure(index, spot, error, retried))
        return outcome, retried

    def reap(self, index: int, reason: str) -> Reap | None:
        task = self.view(index)
        if task.status != RUNNING or task.holder is None:
            return None
        retried = self.block.retries_left(index)
        self._changed[index] = NEW if retried else FAILED
        reap = Reap(index, task.holder, retried)
        self.reaps.setdefault(reason, []).append(reap)
        return reap

    def record(self, at: datetime) -> None:
        for completions in _chunks(self.completions, self.MAX_EVENT_BYTES):
            self.block.complete(completions, at)
        for failures in _chunks(self.failures, self.MAX_EVENT_BYTES):
            self.block.fail(failures, at)
        # A block's reaps are at most its 500 tasks of a few dozen bytes each, but
        # they are split the same way so that no kind of event can outgrow the cap.
        for reason, reaps in self.reaps.items():
            for chunk in _chunks(reaps, self.MAX_EVENT_BYTES - _utf8(reason)):
                self.block.reap(chunk, reason, at)


class _Sized(Protocol):
    @property
    def size(self) -> int: ...


_Item = TypeVar("_Item", bound=_Sized)


def _chunks(items: Sequence[_Item], max_bytes: int) -> list[list[_Item]]:
    """``items`` in order, split where the next would take a chunk past ``max_bytes``.

    An item larger than ``max_bytes`` goes alone in its chunk.
    """
    chunks: list[list[_Item]] = []
    size = max_bytes
    for item in items:
        if size + item.size > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += item.size
    return chunks
