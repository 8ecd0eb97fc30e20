"""Drive Tadpole's seed 003 worker API the way a fleet of spots would.

Jobs are created first (their rate reported apart); then ``--workers`` spots,
each a keep-alive asyncio client (bench/http_client.py, on uvloop), loop: claim up to
``--claim`` tasks, complete each one with its own request; every spot
heartbeats every 3 s on a second connection. The clock runs from the first
claim until every task is completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import uvloop
from http_client import Connection


@dataclass
class Counters:
    completed: int = 0
    claims: int = 0
    empty_claims: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def sweep(tasks: int) -> dict[str, Any]:
    """A sweep of exactly ``tasks`` tasks (one algorithm, one agents value, one dimension)."""
    return {
        "jarPath": "/bench/noop.jar",
        "mainClass": "bench.Noop",
        "algorithms": ["NOOP"],
        "iterations": {"min": 1, "max": tasks, "step": 1},
        "agents": {"min": 1, "max": 1, "step": 1},
        "dimension": {"min": 1, "max": 1, "step": 1},
    }


class Server:
    """Where Tadpole listens; hands out keep-alive connections."""

    def __init__(self, base: str):
        url = urlsplit(base)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80

    def connect(self) -> Connection:
        return Connection(self.host, self.port)


async def create_jobs(server: Server, tasks: int, per_job: int) -> tuple[list[str], float]:
    jobs: list[str] = []
    conn = server.connect()
    started = time.perf_counter()
    remaining = tasks
    while remaining:
        n = min(per_job, remaining)
        status, body = await conn.request("POST", "/api/v1/jobs", sweep(n))
        if status != 201:
            raise SystemExit(f"job creation failed: {status} {body}")
        jobs.append(body["jobId"])
        remaining -= n
    elapsed = time.perf_counter() - started
    conn.close()
    return jobs, elapsed


async def spot(server: Server, claim: int, total: int, c: Counters, done: asyncio.Event) -> None:
    conn, beats = server.connect(), server.connect()
    _, hello = await conn.request("POST", "/internal/v1/hello", {"ipAddress": "127.0.0.1"})
    spot_id = hello["spotId"]

    async def heartbeat() -> None:
        body = {
            "spotId": spot_id,
            "ipAddress": "127.0.0.1",
            "cpuLoad": 1.0,
            "runningTasks": 0,
            "totalCores": 2,
        }
        while not done.is_set():
            await beats.request("POST", "/internal/v1/heartbeat", body)
            await asyncio.sleep(3)

    beat = asyncio.create_task(heartbeat())
    try:
        while not done.is_set():
            t0 = time.perf_counter()
            _, answer = await conn.request(
                "POST", "/internal/v1/tasks/claim", {"spotId": spot_id, "maxTasks": claim}
            )
            tasks = answer["tasks"]
            c.latencies_ms.append((time.perf_counter() - t0) * 1000)
            c.claims += 1
            if not tasks:
                c.empty_claims += 1
                await asyncio.sleep(0.01)
                continue
            for task in tasks:
                body = {
                    "spotId": spot_id,
                    "runtimeMs": 0,
                    "iter": 1,
                    "fopt": 0.0,
                    "fenceToken": task["fenceToken"],
                }
                t0 = time.perf_counter()
                status, answer = await conn.request(
                    "POST", f"/internal/v1/tasks/{task['id']}/complete", body
                )
                c.latencies_ms.append((time.perf_counter() - t0) * 1000)
                if status != 200 or answer.get("message"):
                    c.errors += 1
                else:
                    c.completed += 1
                    if c.completed >= total:
                        done.set()
    finally:
        beat.cancel()
        conn.close()
        beats.close()


async def progress(c: Counters, total: int, done: asyncio.Event) -> None:
    started = time.perf_counter()
    while not done.is_set():
        await asyncio.sleep(1)
        rate = c.completed / (time.perf_counter() - started)
        print(f"  {c.completed}/{total} tasks completed ({rate:,.0f}/s)", file=sys.stderr)


async def drain(server: Server, workers: int, claim: int, tasks: int) -> tuple[Counters, float]:
    """``workers`` spots claim and complete until ``tasks`` completions; the time it took."""
    c = Counters()
    done = asyncio.Event()
    started = time.perf_counter()
    watcher = asyncio.create_task(progress(c, tasks, done))
    await asyncio.wait_for(
        asyncio.gather(*(spot(server, claim, tasks, c, done) for _ in range(workers))),
        timeout=900,
    )
    watcher.cancel()
    return c, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(
    base: str,
    tasks: int,
    workers: int,
    claim: int,
    per_job: int,
    settle: float,
    before_drain: Callable[[], None] | None = None,
    warmup: int = 0,
) -> dict[str, Any]:
    server = Server(base)
    if warmup:
        # Fresh processes, caches and pools: drain a small job first, unmeasured.
        await create_jobs(server, warmup, per_job)
        await drain(server, workers, claim, warmup)
    jobs, create_s = await create_jobs(server, tasks, per_job)
    # Let the read models take in the new jobs' tasks before the clock starts.
    await asyncio.sleep(settle)
    if before_drain is not None:
        before_drain()
    c, elapsed = await drain(server, workers, claim, tasks)
    statuses = []
    conn = server.connect()
    for job in jobs:
        _, answer = await conn.request("GET", f"/api/v1/jobs/{job}")
        statuses.append(answer.get("status", "?"))
    conn.close()
    return {
        "peer": "tadpole",
        "tasks": tasks,
        "completed": c.completed,
        "workers": workers,
        "claim_size": claim,
        "jobs": len(jobs),
        "job_create_seconds": round(create_s, 3),
        "job_create_tasks_per_s": round(tasks / create_s, 1),
        "drain_seconds": round(elapsed, 3),
        "drain_per_s": round(c.completed / elapsed, 1),
        "claims": c.claims,
        "empty_claims": c.empty_claims,
        "refused_completes": c.errors,
        "request_p50_ms": round(percentile(c.latencies_ms, 0.5), 2),
        "request_p99_ms": round(percentile(c.latencies_ms, 0.99), 2),
        "jobs_done": statuses.count("DONE"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="http://127.0.0.1:8080")
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=24)
    parser.add_argument("--claim", type=int, default=5)
    parser.add_argument("--per-job", type=int, default=10000)
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds between creating the jobs and starting the clock",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="tasks drained (unmeasured) before the measured jobs are created",
    )
    parser.add_argument(
        "--reset-lag",
        metavar="REDIS_PREFIX",
        help="clear this deployment's lag samples when the drain starts",
    )
    args = parser.parse_args()

    def reset_lag() -> None:
        if args.reset_lag:
            import redis

            client = redis.Redis()
            for key in client.scan_iter(match=f"{args.reset_lag}:metrics:lag_ms:*"):
                client.delete(key)

    result = uvloop.run(
        run(
            args.base,
            args.tasks,
            args.workers,
            args.claim,
            args.per_job,
            args.settle,
            reset_lag,
            args.warmup,
        )
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
