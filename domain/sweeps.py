"""Parameter sweeps: a job's tasks are the Cartesian product of its ranges.

The sweep is stored once (on the job and on each of its task blocks); a task's
parameters and payload are computed from the sweep and the task's index, so a
100,000-task job needs no 100,000-row event.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import orjson


class SweepError(ValueError):
    """The sweep cannot produce tasks (empty or inverted range, too many tasks)."""


@dataclass(frozen=True)
class Range:
    """Inclusive integer range ``min, min + step, ... <= max``."""

    min: int
    max: int
    step: int

    def values(self) -> range:
        return range(self.min, self.max + 1, self.step)

    def check(self, name: str) -> None:
        if self.step <= 0:
            raise SweepError(f"{name}.step must be greater than zero")
        if self.max < self.min:
            raise SweepError(f"{name} is inverted: max {self.max} is below min {self.min}")


@dataclass(frozen=True)
class TaskParams:
    algorithm: str
    iterations: int
    agents: int
    dimension: int


@dataclass(frozen=True)
class Sweep:
    """What ``POST /api/v1/jobs`` asks for: algorithms × iterations × agents × dimension."""

    jar_path: str
    main_class: str
    algorithms: tuple[str, ...]
    iterations: Range
    agents: Range
    dimension: Range

    def check(self, max_tasks: int) -> None:
        if not self.algorithms:
            raise SweepError("algorithms must name at least one algorithm")
        for name in ("iterations", "agents", "dimension"):
            getattr(self, name).check(name)
        if self.total_tasks > max_tasks:
            raise SweepError(
                f"the sweep makes {self.total_tasks} tasks, above the cap of {max_tasks}"
            )

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (
            len(self.algorithms),
            len(self.iterations.values()),
            len(self.agents.values()),
            len(self.dimension.values()),
        )

    @property
    def total_tasks(self) -> int:
        a, i, g, d = self.shape
        return a * i * g * d

    def params(self, index: int) -> TaskParams:
        """The task at ``index``, in the order algorithms, iterations, agents, dimension."""
        _, n_i, n_g, n_d = self.shape
        index, d = divmod(index, n_d)
        index, g = divmod(index, n_g)
        a, i = divmod(index, n_i)
        return TaskParams(
            algorithm=self.algorithms[a],
            iterations=self.iterations.values()[i],
            agents=self.agents.values()[g],
            dimension=self.dimension.values()[d],
        )

    def payload(self, index: int) -> str:
        """The JSON string a spot receives for the task at ``index``."""
        p = self.params(index)
        return orjson.dumps(
            {
                "alg": p.algorithm,
                "iterations": p.iterations,
                "agents": p.agents,
                "dimension": p.dimension,
                "jarPath": self.jar_path,
                "mainClass": self.main_class,
            }
        ).decode()

    def to_json(self) -> str:
        """Canonical text, stored in events and compared for idempotent retries."""
        data = asdict(self)
        data["algorithms"] = list(self.algorithms)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Sweep:
        data: dict[str, Any] = json.loads(text)
        return cls(
            jar_path=data["jar_path"],
            main_class=data["main_class"],
            algorithms=tuple(data["algorithms"]),
            iterations=Range(**data["iterations"]),
            agents=Range(**data["agents"]),
            dimension=Range(**data["dimension"]),
        )
