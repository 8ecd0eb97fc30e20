"""The ids of workflows, runs and workflow tasks.

A workflow (namespace and name) and a run (namespace, name and run id) have
deterministic aggregate ids, so registering and starting are idempotent. A
workflow task's public id names its run and its task: ``wtask-<run hex>-<task>``.
"""

from __future__ import annotations

import re
from uuid import UUID, uuid5

from domain.ids import TADPOLE_NAMESPACE, UnknownIdError

WORKFLOW_TASK_PREFIX = "wtask-"
#: What a task id in a definition may be (it goes in URLs and ids unescaped).
TASK_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TASK = re.compile(r"wtask-([0-9a-f]{32})-([A-Za-z0-9_.-]{1,64}(?:~compensate)?)")


def definition_uuid(namespace: str, name: str) -> UUID:
    return uuid5(TADPOLE_NAMESPACE, f"workflow:{namespace}/{name}")


def run_uuid(namespace: str, name: str, run_id: str) -> UUID:
    """The run a start with this run id always names."""
    return uuid5(TADPOLE_NAMESPACE, f"workflow-run:{namespace}/{name}/{run_id}")


def workflow_task_id(run: UUID, task: str) -> str:
    return f"{WORKFLOW_TASK_PREFIX}{run.hex}-{task}"


def parse_workflow_task_id(text: str) -> tuple[UUID, str]:
    match = _TASK.fullmatch(text)
    if match is None:
        raise UnknownIdError(text)
    return UUID(hex=match.group(1)), match.group(2)


def parse_instance_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise UnknownIdError(text) from None
