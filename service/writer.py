"""Group commit: the commands of concurrent requests become one store transaction.

Request handlers ``await writer.submit(command)``. One task takes everything
queued, has the :class:`~domain.commands.CommandProcessor` decide it (in memory,
on the event loop) and store it as one transaction (in a worker thread), then
answers every handler. While a batch is being stored the next one gathers, so
the batch grows with the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from domain.commands import Command, CommandProcessor, Decided, Result

log = logging.getLogger(__name__)

MAX_BATCH = 1000


class StoreUnavailableError(RuntimeError):
    """The event store refused the batch; nothing of it was stored (503)."""


#: Stores a batch's events atomically (its notification ids), on the event loop.
Append = Callable[[Sequence[Any]], Awaitable[list[int]]]


class GroupCommitWriter:
    def __init__(self, processor: CommandProcessor, append: Append | None = None):
        """``append``, when given, stores the events without leaving the event loop
        (:class:`service.recorder.AsyncAppender`); without it the processor's own
        store is used, in a worker thread."""
        self.processor = processor
        self.append = append
        self._pending: list[tuple[Command, asyncio.Future[Result]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Versions of the aggregates this writer stored, for read-your-writes.
        self.versions: dict[UUID, int] = {}
        self.batches = 0
        self.commands = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, command: Command) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((command, future))
        self._wake.set()
        return await future

    @property
    def ready(self) -> bool:
        """Recovered from the store; false from a refused batch until the next recovery."""
        return not self.processor.needs_recovery

    def known_versions(self, uuids: Iterable[UUID]) -> dict[UUID, int]:
        return {u: self.versions[u] for u in uuids if u in self.versions}

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    if self.processor.needs_recovery:
                        await asyncio.to_thread(self.processor.recover, datetime.now(UTC))
                    # Deciding is in-memory work on the open aggregates: done right here,
                    # it costs no thread hand-off and no fight for the GIL with this loop.
                    decided = self.processor.decide([c for c, _ in batch], datetime.now(UTC))
                except Exception as error:
                    log.exception("deciding a batch failed")
                    self._fail(batch, error)
                    continue
                # One batch at a time: the next one gathers while this one is stored.
                # (Deciding the next batch during this save was measured slower: it
                # made every request wait for two saves instead of one.)
                await self._store(batch, decided)

    async def _store(
        self, batch: list[tuple[Command, asyncio.Future[Result]]], decided: Decided
    ) -> None:
        try:
            if self.append is None:
                await asyncio.to_thread(self.processor.store_decided, decided)
            elif decided.events:
                await self._append(decided)
        except Exception as error:
            log.exception("the event store refused a batch of %d commands", len(batch))
            self._fail(batch, error)
            return
        self.versions.update(decided.versions)
        self.batches += 1
        self.commands += len(batch)
        for (_, future), result in zip(batch, decided.results, strict=True):
            if not future.done():
                future.set_result(result)

    async def _append(self, decided: Decided) -> None:
        assert self.append is not None
        try:
            await self.append(decided.events)
        except BaseException:
            self.processor.invalidate()
            raise
        if decided.snapshots:  # rare (every 100 events of an aggregate), best effort
            await asyncio.to_thread(self.processor.store.save, [], decided.snapshots)

    @staticmethod
    def _fail(batch: list[tuple[Command, asyncio.Future[Result]]], error: Exception) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(StoreUnavailableError(str(error)))
