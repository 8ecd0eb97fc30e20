"""The saga runner: drives the agent-spawning sagas and plays the mesh-formation
saga's participants (``tadpole sagas``).

It learns of sagas from the event topics — ``agent_lifecycle`` (spawn sagas) and
``mesh_coordination`` (mesh-formation sagas), correlated by the envelope's
correlation id, the saga's id — and, because the broker may lose what it had,
also looks every ``TADPOLE_SAGA_SWEEP_INTERVAL`` at the open sagas of the read
model. Whatever it learns, it only ever *tries*: every step and compensation is
taken from the writer under a lease (``/internal/v1/sagas/...``), which refuses
it when another runner holds it, the step is over, or it is not its turn. So any
number of runners may run, each saga is driven by one at a time, and a runner
killed at any moment leaves nothing that its step's deadline does not end.

* **Orchestration** (agent spawning): the runner takes the saga's next step
  (the aggregate knows the order), runs its handler, reports, and goes on until
  the saga completes or starts compensating, then compensates it step by step.
* **Choreography** (mesh formation): each :class:`Participant` knows only its
  own step, the step it follows, its timeout and its compensation. It reacts to
  the saga's ``Started`` (the first participant) or to the ``StepSucceeded`` of
  the step it follows, and, when compensation reaches its step, compensates it.
  No list of steps is kept anywhere; the writer's timer loop is the timeout
  watcher that starts compensation when a step does not finish in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

import httpx

from domain.ids import saga_id
from domain.sagas.definitions import AGENT_SPAWNING, MESH_FORMATION, MESH_STEPS, StepSpec
from sagas.client import Refused, SagaApi, Taken, taken_from
from sagas.handlers import Faults, Handlers, Report

log = logging.getLogger(__name__)

#: How long past a step's deadline a runner waits for its handler before giving up on it
#: (the writer has timed it out by then).
GRACE_SECONDS = 0.5
#: Sagas one runner drives at once. The rest wait for a slot before their first step
#: (their steps' clocks have not started): a saga once begun goes through its steps
#: at the API's pace instead of queuing every step behind every other saga's.
MAX_SAGAS = 32
#: A saga is swept when it has not changed for this many sweep intervals.
STALE_AFTER = 2


@dataclass(frozen=True)
class Participant:
    """One participant of the mesh-formation choreography."""

    spec: StepSpec
    after: str | None
    final: bool = False

    def follows(self, event: str, data: dict[str, Any]) -> bool:
        """Whether this event is the participant's cue."""
        if self.after is None:
            return event == "Started"
        return event == "StepSucceeded" and data.get("step") == self.after


PARTICIPANTS: tuple[Participant, ...] = (
    Participant(MESH_STEPS[0], after=None),
    Participant(MESH_STEPS[1], after=MESH_STEPS[0].name),
    Participant(MESH_STEPS[2], after=MESH_STEPS[1].name, final=True),
)

_COMPENSATION_CUES = {"CompensationStarted", "StepCompensated", "CompensationFailed"}


def next_to_compensate(event: str, data: dict[str, Any]) -> str | None:
    """The step whose compensation this event makes due (None: none, or the saga's done)."""
    if event == "CompensationStarted":
        steps = data.get("steps") or []
        return steps[0] if steps else None
    if event == "StepCompensated":
        remaining = data.get("remaining") or []
        return remaining[0] if remaining else None
    if event == "CompensationFailed":
        return str(data["step"])
    return None


class SagaRunner:
    """Drives sagas (see the module docstring); one asyncio task per saga it works on."""

    def __init__(
        self,
        api: SagaApi,
        handlers: Handlers,
        faults: Faults | None = None,
        sweep_interval: float = 2.0,
        participants: Iterable[Participant] = PARTICIPANTS,
        max_sagas: int = MAX_SAGAS,
    ):
        self.api = api
        self.handlers = handlers
        self.faults = faults or Faults()
        self.sweep_interval = sweep_interval
        self.participants = tuple(participants)
        #: (saga, role) being worked on here: a cue for one of them is not acted on twice.
        self.busy: set[tuple[str, str]] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(max_sagas)
        self.stopping = asyncio.Event()

    # ---- cues --------------------------------------------------------------------------

    def on_event(self, message_type: str, correlation_id: str, data: dict[str, Any]) -> None:
        """An event of a saga, from the topics: act on it if it is a cue."""
        kind, _, event = message_type.partition(".")
        try:
            saga = saga_id(UUID(correlation_id))
        except ValueError:
            return
        if kind == "AgentSpawning":
            # The drive takes every step in turn: its Started is the only cue it needs
            # (a runner that died mid-way leaves a step to time out, or the sweep).
            if event == "Started":
                self._spawn(saga, "drive", partial(self.drive, saga))
        elif kind == "MeshFormation":
            for participant in self.participants:
                if participant.follows(event, data):
                    role = participant.spec.name
                    self._spawn(saga, role, partial(self.participate, participant, saga))
        if kind in ("AgentSpawning", "MeshFormation") and event in _COMPENSATION_CUES:
            step = next_to_compensate(event, data)
            if step is not None:
                if event == "CompensationFailed":
                    retry = data.get("retry_at")
                    delay = max(0.0, retry.timestamp() - time.time()) if retry else 0.0
                else:
                    delay = 0.0
                if kind == "AgentSpawning":
                    self._spawn(saga, "compensate", partial(self.compensate, saga, delay))
                else:  # the participant whose step it is compensates it
                    self._spawn(
                        saga, f"undo {step}", partial(self.compensate, saga, delay, step=step)
                    )

    def _spawn(self, saga: str, role: str, work: Callable[[], Awaitable[None]]) -> None:
        key = (saga, role)
        if key in self.busy or self.stopping.is_set():
            return
        self.busy.add(key)

        async def run() -> None:
            try:
                async with self.slots:
                    await work()
            except (httpx.HTTPError, OSError) as error:
                log.warning("saga %s (%s): %s; the sweep will try again", saga, role, error)
            except Exception:  # one saga's trouble must not stop the runner
                log.exception("saga %s (%s) failed", saga, role)
            finally:
                self.busy.discard(key)

        task = asyncio.ensure_future(run())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # ---- driving -------------------------------------------------------------------------

    async def run_handler(self, taken: Taken, deadline: float) -> Report | None:
        """The step's handler, with test faults; None when it did not finish by the deadline."""
        fault = self.faults.action(taken)
        if fault == "crash":
            log.warning("fault injected: the runner ends at %s of %s", taken.name, taken.saga_id)
            os._exit(137)
        if fault == "fail":
            return Report(ok=False, error=f"fault injected: {taken.name} failed", apply=False)
        if fault == "hang":
            await asyncio.sleep(max(0.0, deadline - time.time()) + GRACE_SECONDS)
            return None
        try:
            return await asyncio.wait_for(
                self.handlers[taken.name](taken), max(0.0, deadline - time.time()) + GRACE_SECONDS
            )
        except TimeoutError:
            return None

    async def drive(self, saga: str) -> None:
        """Orchestration: take and run the spawn saga's steps until it is not RUNNING, each
        report taking the next step in its batch (one round trip a step)."""
        try:
            taken: Taken | None = await self.api.take_step(saga)
        except Refused:
            return  # another runner drives it, a step runs, or it is over
        while taken is not None and not self.stopping.is_set():
            report = await self.run_handler(taken, _deadline(taken))
            if report is None:
                return  # timed out: the writer compensates, the cue comes
            try:
                finished = await self.api.finish_step(taken, takeNext=True, **report.fields())
            except Refused:
                return
            following = next_taken(finished)
            if finished["sagaState"] == "COMPENSATING":
                await self.compensate(saga, first=following)
                return
            taken = following

    async def participate(self, participant: Participant, saga: str) -> None:
        """Choreography: take this participant's step if it is its turn, run it, report."""
        spec = participant.spec
        try:
            taken = await self.api.take_step(
                saga,
                step=spec.name,
                after=participant.after,
                timeoutMs=int(spec.timeout_seconds * 1000),
                compensation=spec.compensation,
            )
        except Refused:
            return
        report = await self.run_handler(taken, _deadline(taken))
        if report is None:
            return
        with contextlib.suppress(Refused):
            await self.api.finish_step(taken, final=participant.final, **report.fields())

    async def compensate(
        self, saga: str, delay: float = 0.0, first: Taken | None = None, step: str | None = None
    ) -> None:
        """Take and run the saga's compensations one by one, each report taking the next
        (``step``: only that step's, as a participant compensates its own)."""
        if delay:
            await asyncio.sleep(delay)
        taken = first
        if taken is None:
            try:
                taken = await self.api.take_compensation(saga, step)
            except Refused:
                return
        while taken is not None and not self.stopping.is_set():
            report = await self.run_handler(taken, _deadline(taken))
            if report is None:
                return  # the lease lapses: the writer counts it failed, the cue comes
            try:
                finished = await self.api.finish_compensation(
                    taken, takeNext=step is None, **report.fields()
                )
            except Refused:
                return
            taken = next_taken(finished)

    # ---- the sweep -------------------------------------------------------------------------

    async def sweep_once(self) -> None:
        """Try every open saga the read model lists that nothing here works on and that
        has not changed for ``STALE_AFTER`` sweeps: one that moves has its cues coming."""
        quiet_since = time.time() - self.sweep_interval * STALE_AFTER
        for found in await self.api.open_sagas():
            saga, kind, state = found["sagaId"], found["kind"], found["state"]
            updated = found.get("updatedAt")
            if updated and datetime.fromisoformat(updated).timestamp() > quiet_since:
                continue
            if state == "COMPENSATING":
                self._spawn(saga, "compensate", partial(self.compensate, saga))
            elif kind == AGENT_SPAWNING:
                self._spawn(saga, "drive", partial(self.drive, saga))
            elif kind == MESH_FORMATION:
                self._spawn(saga, "choreography", partial(self._resume_choreography, saga))

    async def _resume_choreography(self, saga: str) -> None:
        """A mesh-formation saga whose cue may have been lost: the participant whose step
        follows its last succeeded one tries (the writer refuses it if it is not its turn)."""
        view = await self.api.saga(saga)
        if view is None or view["state"] != "RUNNING":
            return
        steps = view["steps"]
        if steps and steps[-1]["state"] == "RUNNING":
            return
        last = steps[-1]["name"] if steps and steps[-1]["state"] == "SUCCEEDED" else None
        for participant in self.participants:
            if participant.after == last:
                await self.participate(participant, saga)

    async def announce_recovery(self) -> None:
        """Seed 001's ``recovery_process_initiated``, when this runner starts with open sagas
        to carry on (after a restart, say)."""
        found = await self.api.open_sagas()
        if found:
            await self.api.record_system_event(
                "recovery_process_initiated",
                f"saga runner {self.api.driver} started with {len(found)} open sagas",
                {"driver": self.api.driver, "openSagas": len(found)},
            )

    async def sweep(self) -> None:
        with contextlib.suppress(httpx.HTTPError, OSError, KeyError):
            await self.announce_recovery()
        while not self.stopping.is_set():
            try:
                await self.sweep_once()
            except (httpx.HTTPError, OSError, KeyError) as error:
                log.warning("saga sweep failed: %s", error)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.sweep_interval)

    async def stop(self) -> None:
        self.stopping.set()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def next_taken(finished: dict[str, Any]) -> Taken | None:
    """What a report's ``takeNext`` took, if anything."""
    following = finished.get("next")
    if following is None:
        return None
    return taken_from(following, compensation=finished["sagaState"] == "COMPENSATING")


def _deadline(taken: Taken) -> float:
    return taken.deadline.timestamp()


class TopicCues:
    """Feeds the saga events of the topics to a runner: a consumer in a thread, each
    message handed to the runner's loop."""

    def __init__(
        self,
        bootstrap_servers: str,
        group: str,
        topics: list[str],
        deliver: Callable[[str, str, dict[str, Any]], None],
        loop: asyncio.AbstractEventLoop,
    ):
        self.bootstrap_servers = bootstrap_servers
        self.group = group
        self.topics = topics
        self.deliver = deliver
        self.loop = loop
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="saga-cues", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        from confluent_kafka import Consumer

        from schemas.codec import Codec, DecodeError
        from streaming.topics import consumer_config

        codec = Codec()
        consumer = Consumer(
            consumer_config(self.bootstrap_servers, self.group, **{"enable.auto.commit": True})
        )
        consumer.subscribe(self.topics)
        try:
            while not self.stopping.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error() is not None:
                    continue
                value = msg.value()
                if not value:
                    continue
                try:
                    m = codec.decode(value)
                except DecodeError:
                    continue  # the projectors dead-letter it; the sweep covers the saga
                if m.type.startswith(("AgentSpawning.", "MeshFormation.")):
                    self.loop.call_soon_threadsafe(self.deliver, m.type, m.correlation_id, m.data)
        finally:
            consumer.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
