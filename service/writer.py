"""Group commit: the commands of concurrent requests become one store transaction.

Request handlers ``await writer.submit(command)``. One task takes everything
queued, has the :class:`~domain.commands.CommandProcessor` decide it (in memory,
on the event loop) and store it as one transaction, then answers every handler.
While a batch is being stored the next one gathers, so the batch grows with the
load.

Every command is answered within about ``timeout`` seconds, and a command whose
caller stopped waiting is never decided. A command still queued at its deadline,
or whose client went away, is answered 503 (:class:`StoreUnavailableError`) and
dropped from the queue: deciding it later would, say, hand out tasks nobody
receives. A batch already being stored is bounded by the appender's own timeout.
When the store refuses a batch the writer reloads from the store before the next
one; while it cannot (the store is down) every command is answered 503 at once,
and the writer probes the store with a growing pause until it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from domain.family import (
    Command,
    OutcomeUnknownError,
    Reaped,
    Recent,
    Result,
    StoreUnavailableError,
)
from domain.jobs import ReleaseClaims
from domain.processor import CommandProcessor, Decided
from domain.spots import Claimed, ClaimTasks

__all__ = ["GroupCommitWriter", "OutcomeUnknownError", "StoreUnavailableError"]

log = logging.getLogger(__name__)

MAX_BATCH = 1000
#: Aggregates whose last stored version the writer remembers for read-your-writes.
VERSIONS_KEPT = 65_536
#: Seconds a request waits before its client's disconnect is watched for: most
#: commands are answered well within it, and then no watcher is ever started.
WATCH_AFTER = 0.05
#: How often the writer looks again for work for waiting claims without a stored
#: batch (a retry's backoff may have run out).
WAITING_RECHECK = 0.25
#: First and longest pause between two attempts to reach a store that is down.
RETRY_FIRST, RETRY_MAX = 0.2, 2.0


#: Stores a batch's events atomically with the changes to the index of open work
#: (opened: id → class name; closed ids); their notification ids. On the event loop.
Append = Callable[[Sequence[Any], Mapping[UUID, str], Sequence[UUID]], Awaitable[list[int]]]
#: Which of these aggregates the store has; on the event loop.
LookUp = Callable[[Sequence[UUID]], Awaitable[set[UUID]]]
#: Returns when the store answers; raises when it cannot be reached.
Probe = Callable[[], Awaitable[None]]
#: Returns when the client that sent a command is gone.
Disconnected = Callable[[], Awaitable[object]]

_Queued = tuple[Command, "asyncio.Future[Result]", float]  # command, answer, deadline


class GroupCommitWriter:
    def __init__(
        self,
        processor: CommandProcessor,
        append: Append | None = None,
        *,
        timeout: float = 2.0,
        probe: Probe | None = None,
        look_up: LookUp | None = None,
    ):
        """``append``, when given, stores the events without leaving the event loop
        (:class:`eventstore.recorder.AsyncAppender`); without it the processor's own
        store is used, in a worker thread. ``look_up`` tells, without leaving the
        loop, which aggregates a batch may load exist (see
        :meth:`CommandProcessor.to_look_up`): without it the processor reads them
        itself. ``probe`` checks the store is reachable before the writer reloads
        from it; ``timeout`` is how long a command may wait in the queue."""
        self.processor = processor
        self.append = append
        self.look_up = look_up
        self.probe = probe
        self.timeout = timeout
        self._pending: list[_Queued] = []
        #: Claims of failed batches, to release once the store is back (they may be stored).
        self._unanswered: list[tuple[str, str, int]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Future[Any]] = set()
        #: Since when the store has been unreachable (None: it is not known to be).
        self.down_since: datetime | None = None
        self._last_failed = False
        #: Versions of the aggregates this writer stored lately, for read-your-writes
        #: (bounded: a long-running writer must not hold every aggregate it ever wrote).
        self.versions: Recent[UUID, int] = Recent(VERSIONS_KEPT)
        self.batches = 0
        self.commands = 0
        #: Commands of the batch being stored (0: none is).
        self.storing = 0
        #: Long-polling claims that found nothing, the longest waiting first.
        self._waiting: dict[asyncio.Future[None], None] = {}
        self._recheck: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        """True when the processor holds the store's state and the last store operation
        succeeded: commands are being decided and stored (for ``GET /ready``)."""
        return not (self._last_failed or self.processor.needs_recovery)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        for task in [self._task, *self._background]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for timer in (self._expiry, self._recheck):
            if timer is not None:
                timer.cancel()

    async def submit(self, command: Command, disconnected: Disconnected | None = None) -> Result:
        """Decide and store ``command``; its result.

        Raises :class:`StoreUnavailableError` at once while the store is down, and
        when the command is still queued at its deadline or ``disconnected()``
        returns first (then it is never decided).
        """
        if self.down_since is not None:
            raise StoreUnavailableError(f"the event store is unreachable since {self.down_since}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        deadline = loop.time() + self.timeout
        self._pending.append((command, future, deadline))
        if self._expiry is None:  # one timer for the whole queue: it is in deadline order
            self._expiry = loop.call_at(deadline, self._expire)
        self._wake.set()
        if disconnected is None:
            return await future
        watch = loop.call_later(WATCH_AFTER, self._watch, future, disconnected)
        try:
            return await future
        finally:
            watch.cancel()

    async def wait_for_work(self, timeout: float) -> None:
        """Return when a claim may find a task, or after ``timeout`` seconds.

        For long-polling claims that found nothing. After every stored batch, and
        every :data:`WAITING_RECHECK` seconds while any waits, the writer counts the
        tasks a claim could take now and wakes that many waiting claims, the
        longest waiting first: a task that becomes claimable wakes one claim, not
        every idle worker's.
        """
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[woken] = None
        self._arm_recheck()
        try:
            await asyncio.wait_for(woken, timeout)
        except TimeoutError:
            pass
        finally:
            self._waiting.pop(woken, None)

    def _wake_waiting(self) -> None:
        if not self._waiting or self.processor.needs_recovery:
            return
        n = self.processor.claimable(datetime.now(UTC), len(self._waiting))
        for woken in list(self._waiting)[:n]:
            del self._waiting[woken]
            if not woken.done():
                woken.set_result(None)

    def _arm_recheck(self) -> None:
        if self._recheck is None:
            self._recheck = asyncio.get_running_loop().call_later(WAITING_RECHECK, self._rechecked)

    def _rechecked(self) -> None:
        self._recheck = None
        self._wake_waiting()
        if self._waiting:
            self._arm_recheck()

    def known_versions(self, uuids: Iterable[UUID]) -> dict[UUID, int]:
        found = {u: self.versions.get(u) for u in uuids}
        return {u: v for u, v in found.items() if v is not None}

    # ---- the queue -----------------------------------------------------------------

    def _expire(self) -> None:
        """Answer the queued commands whose deadline passed; arm for the next one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = 0
        for _, future, deadline in self._pending:
            if deadline > now:
                break
            _withdraw(future, "the command was not decided in time")
            expired += 1
        del self._pending[:expired]
        self._expiry = loop.call_at(self._pending[0][2], self._expire) if self._pending else None

    def _watch(self, future: asyncio.Future[Result], disconnected: Disconnected) -> None:
        async def watch() -> None:
            await disconnected()
            _withdraw(future, "the client went away before its command was decided")

        task = self._keep(watch())
        future.add_done_callback(lambda _: task.cancel())

    def _keep(self, work: Awaitable[None]) -> asyncio.Future[None]:
        """Run ``work`` in the background, holding on to it until it ends."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _take(self) -> list[_Queued]:
        """The next batch: queued commands still awaited and within their deadline."""
        chunk = self._pending[:MAX_BATCH]
        del self._pending[:MAX_BATCH]
        now = asyncio.get_running_loop().time()
        batch = []
        for queued in chunk:
            if queued[1].done():  # withdrawn: expired, or its client went away
                continue
            if queued[2] <= now:  # the loop was too busy for the expiry timer
                _withdraw(queued[1], "the command was not decided in time")
                continue
            batch.append(queued)
        return batch

    # ---- the writer's task ---------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if self.processor.needs_recovery:
                await self._recover()
                if self._unanswered:  # before any other command: see _release_unanswered
                    await self._release_unanswered()
                continue
            if not self._pending:
                await self._wake.wait()
                self._wake.clear()
                continue
            batch = self._take()
            if not batch:
                continue
            commands = [c for c, _, _ in batch]
            try:
                absent = await self._absent(commands)
            except Exception as error:
                log.exception("looking up the aggregates of a batch failed")
                self._last_failed = True
                self.processor.invalidate()  # reloads once the store answers the probe
                self._fail(batch, error)
                continue
            try:
                # Deciding is in-memory work on the open aggregates: done right here,
                # it costs no thread hand-off and no fight for the GIL with this loop.
                decided = self.processor.decide(commands, datetime.now(UTC), absent)
            except Exception as error:
                log.exception("deciding a batch failed")
                self.processor.invalidate()  # it may have changed aggregates half-way
                self._fail(batch, error)
                continue
            # One batch at a time: the next one gathers while this one is stored.
            # (Deciding the next batch during this save was measured slower: it
            # made every request wait for two saves instead of one.)
            await self._store(batch, decided)

    async def _absent(self, commands: Sequence[Command]) -> set[UUID]:
        """The aggregates these commands may load that the store does not have, asked
        without blocking the loop: a new run's idempotency check then costs no read
        on the loop. Nothing else stores in between: this task is the single writer."""
        if self.look_up is None:
            return set()
        wanted = self.processor.to_look_up(commands)
        if not wanted:
            return set()
        return set(wanted) - await self.look_up(wanted)

    async def _recover(self) -> None:
        """Reload the processor from the store; while it is down, retry with a growing pause."""
        pause = RETRY_FIRST
        while True:
            try:
                if self.probe is not None:  # bounded, unlike the reload's own connects
                    await self.probe()
                await asyncio.to_thread(self.processor.recover, datetime.now(UTC))
            except Exception as error:
                self._store_down(error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            if self.down_since is not None:
                log.warning("the event store is back (down since %s)", self.down_since)
            self.down_since = None
            self._last_failed = False
            return

    async def _release_unanswered(self) -> None:
        """Undo the claims of a failed batch that the store may have kept all the same.

        An append whose connection was lost after the commit stored a claim whose
        spot was told 503: its tasks would stay RUNNING under a spot that never
        got them for as long as it heartbeats. Once the writer has reloaded, it
        releases exactly those tasks that are still held as that claim left them.
        It is decided right after the reload, before any other command: a fence
        names one claim of a task, so a task still RUNNING under that spot with
        that fence was handed out by the lost claim and no other.
        """
        claims, self._unanswered = tuple(self._unanswered), []
        release = ReleaseClaims(claims)
        answer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            decided = self.processor.decide([release], datetime.now(UTC))
        except Exception:  # not the store's doing: trying again would fail the same way
            log.exception("deciding the release of unanswered claims %s failed", claims)
            self.processor.invalidate()
            return
        await self._store([(release, answer, float("inf"))], decided)
        if answer.exception() is not None:
            self._unanswered.extend(claims)  # the next recovery tries again
            return
        result = answer.result()
        if isinstance(result, Reaped) and result.tasks:
            log.warning("released %d tasks of claims whose answer was lost", len(result.tasks))

    def _store_down(self, error: Exception) -> None:
        self._last_failed = True
        if self.down_since is None:
            self.down_since = datetime.now(UTC)
            log.error("the event store is unreachable, answering 503 until it is back: %s", error)
        queued, self._pending = self._pending, []
        for _, future, _ in queued:
            _withdraw(future, f"the event store is unreachable: {error}")

    async def _store(self, batch: list[_Queued], decided: Decided) -> None:
        self.storing = len(batch)
        try:
            if self.append is None:
                await asyncio.to_thread(self.processor.store_decided, decided)
            elif decided.events:
                await self._append(decided)
        except Exception as error:
            log.exception("the event store refused a batch of %d commands", len(batch))
            self._last_failed = True
            self._unanswered.extend(_claims(batch, decided))
            self._fail(batch, error)
            return
        finally:
            self.storing = 0
        self._last_failed = False
        for uuid, version in decided.versions.items():
            self.versions.put(uuid, version)
        self.batches += 1
        self.commands += len(batch)
        for (_, future, _), result in zip(batch, decided.results, strict=True):
            if not future.done():
                future.set_result(result)
        if decided.events:  # it may have made work claimable
            self._wake_waiting()

    async def _append(self, decided: Decided) -> None:
        assert self.append is not None
        try:
            await self.append(decided.events, decided.opened, decided.closed)
        except BaseException:
            self.processor.invalidate()
            raise
        if decided.snapshots:  # rare (every 100 events of an aggregate), best effort
            saving = self._keep(
                asyncio.to_thread(self.processor.store.save, [], decided.snapshots, {}, [])
            )
            # Not waited for past the deadline: the reload's connects are not bounded.
            await asyncio.wait([saving], timeout=self.timeout)

    @staticmethod
    def _fail(batch: list[_Queued], error: Exception) -> None:
        kind = OutcomeUnknownError if isinstance(error, TimeoutError) else StoreUnavailableError
        for _, future, _ in batch:
            if not future.done():
                future.set_exception(kind(str(error) or type(error).__name__))


def _claims(batch: list[_Queued], decided: Decided) -> list[tuple[str, str, int]]:
    """``(task id, spot, fence)`` of every task the batch's claims handed out."""
    return [
        (task.task_id, command.spot_id, task.fence)
        for (command, _, _), result in zip(batch, decided.results, strict=True)
        if isinstance(command, ClaimTasks) and isinstance(result, Claimed)
        for task in result.tasks
    ]


def _withdraw(future: asyncio.Future[Result], why: str) -> None:
    if not future.done():
        future.set_exception(StoreUnavailableError(why))
