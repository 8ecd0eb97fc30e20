"""The public ids of Tadpole's entities, and the aggregate ids behind them.

Jobs and spots are one aggregate each (``job-<hex>`` is the job aggregate's UUID).
A job's tasks live in blocks that one :class:`~domain.tasks.TaskBlock` aggregate
owns, so ``task-<job hex>-<n>`` names the n-th task of a job and its block is
derived, never looked up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from uuid import NAMESPACE_URL, UUID, uuid5

JOB_PREFIX = "job-"
SPOT_PREFIX = "spot-"
TASK_PREFIX = "task-"

#: Namespace of the deterministic ids (idempotent job creation, task blocks).
TADPOLE_NAMESPACE = uuid5(NAMESPACE_URL, "https://tadpole.dev/ids")

_HEX = re.compile(r"[0-9a-f]{32}")
_TASK = re.compile(r"task-([0-9a-f]{32})-(0|[1-9][0-9]{0,8})")


class UnknownIdError(LookupError):
    """A string that is not one of Tadpole's ids: callers answer 404."""


def job_id(uuid: UUID) -> str:
    return JOB_PREFIX + uuid.hex


def spot_id(uuid: UUID) -> str:
    return SPOT_PREFIX + uuid.hex


def task_id(job: UUID, index: int) -> str:
    return f"{TASK_PREFIX}{job.hex}-{index}"


def _parse_hex(text: str, prefix: str) -> UUID:
    rest = text[len(prefix) :] if text.startswith(prefix) else ""
    if not _HEX.fullmatch(rest):
        raise UnknownIdError(text)
    return UUID(hex=rest)


def parse_job_id(text: str) -> UUID:
    return _parse_hex(text, JOB_PREFIX)


def parse_spot_id(text: str) -> UUID:
    return _parse_hex(text, SPOT_PREFIX)


@dataclass(frozen=True)
class TaskRef:
    """Where a task lives: its job and its index in the job's sweep."""

    job: UUID
    index: int

    @property
    def id(self) -> str:
        return task_id(self.job, self.index)


def parse_task_id(text: str) -> TaskRef:
    match = _TASK.fullmatch(text)
    if match is None:
        raise UnknownIdError(text)
    return TaskRef(UUID(hex=match.group(1)), int(match.group(2)))


def job_for_key(idempotency_key: str) -> UUID:
    """The job a retried ``POST /api/v1/jobs`` with this key always names."""
    return uuid5(TADPOLE_NAMESPACE, "job-idempotency:" + idempotency_key)


@lru_cache(maxsize=1 << 16)
def block_id(job: UUID, block_number: int) -> UUID:
    return uuid5(job, f"block-{block_number}")


# ---- agents, meshes, sagas, targets and contexts (seeds 000 and 001) -------------------

AGENT_PREFIX = "agent-"
MESH_PREFIX = "mesh-"
SAGA_PREFIX = "saga-"

#: What a target's or a context's id may be: it is chosen by the caller, appears in
#: URLs unescaped and fits seed 000's ``VARCHAR(64)`` key.
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def agent_id(uuid: UUID) -> str:
    return AGENT_PREFIX + uuid.hex


def mesh_id(uuid: UUID) -> str:
    return MESH_PREFIX + uuid.hex


def saga_id(uuid: UUID) -> str:
    return SAGA_PREFIX + uuid.hex


def parse_agent_id(text: str) -> UUID:
    return _parse_hex(text, AGENT_PREFIX)


def parse_mesh_id(text: str) -> UUID:
    return _parse_hex(text, MESH_PREFIX)


def parse_saga_id(text: str) -> UUID:
    return _parse_hex(text, SAGA_PREFIX)


def _named(kind: str, name: str) -> UUID:
    if not NAME.fullmatch(name):
        raise UnknownIdError(name)
    return uuid5(TADPOLE_NAMESPACE, f"{kind}:{name}")


def target_uuid(name: str) -> UUID:
    """The aggregate of the target the caller calls ``name``."""
    return _named("target", name)


def context_uuid(name: str) -> UUID:
    """The aggregate of the execution context the caller calls ``name``."""
    return _named("context", name)


def saga_for_key(kind: str, idempotency_key: str) -> UUID:
    """The saga a retried start with this ``Idempotency-Key`` always names."""
    return uuid5(TADPOLE_NAMESPACE, f"saga-idempotency:{kind}:{idempotency_key}")
