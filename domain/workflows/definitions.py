"""Workflow definitions: a DAG of tasks, each with a payload, retries, a timeout and a compensation.

A definition is checked once, when it is registered; a registered version is
immutable (its canonical JSON is stored in ``WorkflowDefinition.Registered`` and
compared when the same name and version are registered again).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from domain.workflows.ids import TASK_NAME

#: Seed 001's retry policy: base 1 s, doubled each attempt, at most 10 s.
BACKOFF_BASE, BACKOFF_FACTOR, BACKOFF_MAX = 1.0, 2.0, 10.0
DEFAULT_MAX_ATTEMPTS = 3
MAX_TASKS = 1000
MAX_NAME = 255
#: Bounds that keep every timer a datetime can hold and every attempt count an int.
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600
MAX_BACKOFF_SECONDS = 3600
MAX_ATTEMPTS = 100


class DefinitionError(ValueError):
    """A definition that cannot run: what is wrong is in the message (422)."""


@dataclass(frozen=True)
class Retry:
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_seconds: float = BACKOFF_BASE

    def delay(self, attempt: int, jitter: float) -> float:
        """Seconds before attempt ``attempt + 1``, after ``attempt`` failed; ``jitter`` in [0, 1).

        Exponential from ``backoff_seconds`` (×2 per attempt, at most 10 s, or the
        base if that is larger), with "equal jitter": half fixed, half random.
        """
        ceiling = max(BACKOFF_MAX, self.backoff_seconds)
        full = min(ceiling, self.backoff_seconds * BACKOFF_FACTOR ** max(0, attempt - 1))
        return full / 2 + full / 2 * jitter


@dataclass(frozen=True)
class TaskSpec:
    id: str
    depends_on: tuple[str, ...] = ()
    payload: dict[str, Any] = field(default_factory=dict)
    retry: Retry = Retry()
    timeout_seconds: float | None = None
    compensation: dict[str, Any] | None = None


@dataclass(frozen=True)
class Definition:
    namespace: str
    name: str
    version: str
    tasks: tuple[TaskSpec, ...]
    compensate_on_failure: bool = True

    @cached_property
    def by_id(self) -> dict[str, TaskSpec]:
        return {t.id: t for t in self.tasks}

    def check(self) -> None:
        """Refuse an empty task list, duplicate ids, unknown dependencies and cycles."""
        for label, value in (("namespace", self.namespace), ("name", self.name)):
            if not value or len(value) > MAX_NAME or "/" in value:
                raise DefinitionError(f"{label} must be 1-{MAX_NAME} characters without '/'")
        if not self.version or len(self.version) > MAX_NAME:
            raise DefinitionError(f"version must be 1-{MAX_NAME} characters")
        if not self.tasks:
            raise DefinitionError("tasks must list at least one task")
        if len(self.tasks) > MAX_TASKS:
            raise DefinitionError(f"a workflow has at most {MAX_TASKS} tasks")
        seen: set[str] = set()
        for task in self.tasks:
            if not TASK_NAME.fullmatch(task.id):
                raise DefinitionError(
                    f"task id {task.id!r} must be 1-64 of A-Z, a-z, 0-9, '_', '.' and '-'"
                )
            if task.id in seen:
                raise DefinitionError(f"task id {task.id!r} appears more than once")
            seen.add(task.id)
        for task in self.tasks:
            for dep in task.depends_on:
                if dep not in seen:
                    raise DefinitionError(f"task {task.id!r} depends on unknown task {dep!r}")
            if not 1 <= task.retry.max_attempts <= MAX_ATTEMPTS:
                raise DefinitionError(
                    f"task {task.id!r}: retry.maxAttempts must be 1 to {MAX_ATTEMPTS}"
                )
            if not 0 <= task.retry.backoff_seconds <= MAX_BACKOFF_SECONDS:
                raise DefinitionError(
                    f"task {task.id!r}: retry.backoffSeconds must be 0 to {MAX_BACKOFF_SECONDS}"
                )
            timeout = task.timeout_seconds
            if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_SECONDS:
                raise DefinitionError(
                    f"task {task.id!r}: timeoutSeconds must be above 0 and at most "
                    f"{MAX_TIMEOUT_SECONDS}"
                )
        cycle = self._cycle()
        if cycle:
            raise DefinitionError("the dependencies form a cycle: " + " -> ".join(cycle))

    def _cycle(self) -> list[str] | None:
        """A dependency cycle as a path that ends where it starts, or None."""
        deps = {t.id: t.depends_on for t in self.tasks}
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        path: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            path.append(node)
            for dep in deps[node]:
                if state.get(dep) == 1:
                    return [*path[path.index(dep) :], dep]
                if dep not in state:
                    found = visit(dep)
                    if found:
                        return found
            path.pop()
            state[node] = 2
            return None

        for task in self.tasks:
            if task.id not in state:
                found = visit(task.id)
                if found:
                    return found
        return None

    # ---- canonical JSON (stored, and compared on a second registration) --------------

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))

    def as_dict(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "version": self.version,
            "compensateOnFailure": self.compensate_on_failure,
            "tasks": [
                {
                    "id": t.id,
                    "dependsOn": list(t.depends_on),
                    "payload": t.payload,
                    "retry": {
                        "maxAttempts": t.retry.max_attempts,
                        "backoffSeconds": t.retry.backoff_seconds,
                    },
                    "timeoutSeconds": t.timeout_seconds,
                    "compensation": t.compensation,
                }
                for t in self.tasks
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Definition:
        """From the API's (and the stored) JSON shape; raises DefinitionError on a bad shape."""
        try:
            tasks = tuple(_task(t) for t in _list(data.get("tasks"), "tasks"))
            return cls(
                namespace=_str(data.get("namespace"), "namespace"),
                name=_str(data.get("name"), "name"),
                version=str(_scalar(data.get("version"), "version")),
                tasks=tasks,
                compensate_on_failure=bool(data.get("compensateOnFailure", True)),
            )
        except (TypeError, KeyError) as error:
            raise DefinitionError(str(error)) from None

    @classmethod
    def from_json(cls, text: str) -> Definition:
        return cls.from_dict(json.loads(text))


@lru_cache(maxsize=256)
def parsed(text: str) -> Definition:
    """A stored definition, parsed once: versions are immutable, so every run of one
    version shares one :class:`Definition` (never changed once built)."""
    return Definition.from_json(text)


def _task(t: Any) -> TaskSpec:
    if not isinstance(t, dict):
        raise DefinitionError("each task must be an object")
    tid = _str(t.get("id"), "task id")
    retry = t.get("retry") or {}
    if not isinstance(retry, dict):
        raise DefinitionError(f"task {tid!r}: retry must be an object")
    payload = t.get("payload") or {}
    if not isinstance(payload, dict):
        raise DefinitionError(f"task {tid!r}: payload must be an object")
    compensation = t.get("compensation")
    if compensation is not None and not isinstance(compensation, dict):
        raise DefinitionError(f"task {tid!r}: compensation must be an object")
    timeout = t.get("timeoutSeconds")
    return TaskSpec(
        id=tid,
        depends_on=tuple(
            _str(d, f"task {tid!r} dependsOn") for d in _list(t.get("dependsOn") or [], "dependsOn")
        ),
        payload=payload,
        retry=Retry(
            max_attempts=int(
                _number(retry.get("maxAttempts", DEFAULT_MAX_ATTEMPTS), "maxAttempts")
            ),
            backoff_seconds=float(
                _number(retry.get("backoffSeconds", BACKOFF_BASE), "backoffSeconds")
            ),
        ),
        timeout_seconds=None if timeout is None else float(_number(timeout, "timeoutSeconds")),
        compensation=compensation,
    )


def _str(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{label} must be a string")
    return value


def _scalar(value: Any, label: str) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DefinitionError(f"{label} must be a string or an integer")
    return value


def _number(value: Any, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DefinitionError(f"{label} must be a number")
    return float(value)


def _list(value: Any, label: str) -> list[Any]:
    if not isinstance(value, list):
        raise DefinitionError(f"{label} must be a list")
    return value
