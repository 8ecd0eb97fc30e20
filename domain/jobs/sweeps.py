"""Parameter sweeps: a job's tasks are the Cartesian product of its ranges.

The sweep is stored once, in the job's ``Job.Created``; its task blocks name the
job. A task's parameters and payload are computed from the sweep and the task's
index, so a 100,000-task job needs no 100,000-row event.

What one sweep may cost is bounded twice: in tasks (the blocks the writer creates
and every read model's rows) and in bytes of canonical JSON (the ``Job.Created``
event, which must stay well under the broker's 1 MB message size, and the
parsing every reader of it does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache
from typing import Any

import orjson

#: Every number of a range must fit a signed 32-bit integer: the read model's
#: ``tasks.iterations``/``agents``/``dimension`` columns are ``integer`` (a larger
#: value would stop the PostgreSQL projector at its INSERT) and a spot reads
#: them as a Java ``int``. Within this, Avro ``long`` and ``bigint`` fit too.
VALUE_MIN, VALUE_MAX = -(2**31), 2**31 - 1


class SweepError(ValueError):
    """The sweep cannot produce tasks (empty or inverted range, too many tasks or bytes)."""


@dataclass(frozen=True)
class Range:
    """Inclusive integer range ``min, min + step, ... <= max``."""

    min: int
    max: int
    step: int

    def values(self) -> range:
        return range(self.min, self.max + 1, self.step)

    @property
    def count(self) -> int:
        """How many values, by arithmetic (``len(range)`` overflows past 2**63)."""
        return (self.max - self.min) // self.step + 1

    def value(self, n: int) -> int:
        return self.min + n * self.step

    def check(self, name: str) -> None:
        for part in ("min", "max", "step"):
            number = getattr(self, part)
            if not VALUE_MIN <= number <= VALUE_MAX:
                raise SweepError(
                    f"{name}.{part} is {number}, outside {VALUE_MIN} .. {VALUE_MAX} "
                    "(a signed 32-bit integer)"
                )
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

    def check(self, max_tasks: int, max_bytes: int) -> None:
        """Refuse a sweep that makes no task, or more than ``max_tasks`` or ``max_bytes``.

        The byte cap is on :meth:`to_json`, the text ``Job.Created`` stores.
        """
        if not self.algorithms:
            raise SweepError("algorithms must name at least one algorithm")
        for name in ("iterations", "agents", "dimension"):
            getattr(self, name).check(name)
        if self.total_tasks > max_tasks:
            raise SweepError(
                f"the sweep makes {self.total_tasks} tasks, above the cap of {max_tasks}"
            )
        size = len(self.to_json())  # ASCII: json.dumps escapes the rest
        if size > max_bytes:
            raise SweepError(
                f"the sweep is {size} bytes as canonical JSON, above the cap of {max_bytes} bytes"
            )

    @cached_property
    def shape(self) -> tuple[int, int, int, int]:
        return (
            len(self.algorithms),
            self.iterations.count,
            self.agents.count,
            self.dimension.count,
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
            iterations=self.iterations.value(i),
            agents=self.agents.value(g),
            dimension=self.dimension.value(d),
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
        return self._json

    @cached_property
    def _json(self) -> str:
        # What ``asdict`` gives, without its deep copy of every algorithm name
        # (a tenth of a second for a sweep of 100,000 names).
        data: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        data["algorithms"] = list(self.algorithms)
        for name in ("iterations", "agents", "dimension"):
            r = data[name]
            data[name] = {"min": r.min, "max": r.max, "step": r.step}
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


@lru_cache(maxsize=8)
def parse(text: str) -> Sweep:
    """``Sweep.from_json``, remembered for the few jobs being claimed from at a time.

    A parsed sweep near the byte cap holds tens of thousands of strings, so only
    a few are kept.
    """
    return Sweep.from_json(text)
