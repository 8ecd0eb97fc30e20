"""Task callables the e2e tests' workflows name (``tests.e2e.worker_tasks:step``).

The reference worker imports them from the directory it was started in, as a
user's worker imports theirs.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from service.execution import TaskContext


def step(given: dict[str, Any], task: TaskContext) -> dict[str, Any]:
    """Adds its ``add`` to the total its dependencies passed on (or the run's ``start``)."""
    before = [out["total"] for out in given["tasks"].values()]
    total = sum(before) if before else given["input"]["start"]
    return {"total": total + task.payload["add"], "by": os.getpid(), "step": task.task_id}


async def hold(given: dict[str, Any], task: TaskContext) -> dict[str, Any]:
    """Writes ``<dir>/<instance>.<attempt>.started``, then waits until ``<dir>/release`` exists.

    A worker started with WORKER_TASKS_HOLD_FOREVER=1 never finds it released, so
    only a stop can end the task there.
    """
    folder = Path(task.payload["dir"])
    (folder / f"{task.instance_id}.{task.attempt}.started").write_text(str(os.getpid()))
    forever = os.environ.get("WORKER_TASKS_HOLD_FOREVER") == "1"
    while forever or not (folder / "release").exists():
        await asyncio.sleep(0.05)
    return {"held": task.task_id, "by": os.getpid(), "attempt": task.attempt}
