"""How the pipeline is doing: each step's distance behind the store, and its dead letters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from eventstore.store import TadpoleStore
from streaming.deadletters import RELAY, DeadLetters, projector_stage
from streaming.progress import Progress

#: Every step that feeds something from the store, in the order health lists them.
STAGES = (RELAY, projector_stage("postgres"), projector_stage("redis"))


@dataclass(frozen=True)
class StageStatus:
    name: str
    position: int
    behind_events: int
    behind_seconds: float
    dead_letters: int

    def lagging(self, limit: float) -> bool:
        """More than ``limit`` seconds behind with events waiting."""
        return self.behind_events > 0 and self.behind_seconds > limit

    def as_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "behindEvents": self.behind_events,
            "behindSeconds": self.behind_seconds,
            "deadLetters": self.dead_letters,
        }


class PipelineStatus:
    """Reads the steps' positions and dead letters beside the store (sync: run it in a thread)."""

    def __init__(self, store: TadpoleStore):
        self.store = store
        self.progress = Progress(store)
        self.letters = DeadLetters(store)

    def stages(self, now: datetime) -> tuple[int, list[StageStatus]]:
        """The store's last position, and each step's status.

        A step's seconds behind are the age of the oldest event it has not
        reached: a step that keeps up shows 0 however busy it is.
        """
        last = self.store.max_position()
        positions = self.progress.positions()
        letters = self.letters.counts()
        out: list[StageStatus] = []
        for name in STAGES:
            position = min(positions.get(name, (0, None))[0], last)
            behind = last - position
            seconds = 0.0
            if behind:
                waiting = self.store.notifications(position, 1)
                if waiting:
                    event: Any = self.store.mapper.to_domain_event(waiting[0])
                    created = event.timestamp
                    seconds = max(0.0, (now - created).total_seconds())
            out.append(StageStatus(name, position, behind, round(seconds, 3), letters.get(name, 0)))
        return last, out
