"""Retrying a long-running loop's step: growing pauses with jitter."""

from __future__ import annotations

import random


class Backoff:
    """Pauses that double from ``first`` to ``most`` seconds, with jitter, until reset."""

    def __init__(self, first: float = 0.1, most: float = 5.0):
        self.first = first
        self.most = most
        self.pause = first

    def next(self) -> float:
        pause = self.pause
        self.pause = min(self.pause * 2, self.most)
        return pause * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.pause = self.first
