"""Does creating the largest allowed job stall the single writer?

Two measurements, on the code of the tree this script sits in:

1. The writer alone (no HTTP): a ``CommandProcessor`` on a scratch PostgreSQL
   store schema decides and stores ``CreateJob`` of the largest allowed job
   (100,000 tasks, a sweep near the 256 KiB byte cap), ``--writer-runs`` times:
   milliseconds to decide, to store, and the bytes stored per job.
2. The stack (`tadpole up`, embedded broker, fresh schemas, as bench/run.py
   starts it): ``--workers`` spots send a steady, paced stream of claims (up to
   5), completes and heartbeats, and one more client says hello every 0.5 s.
   Their latencies (p50, p99, max) are taken (a) for ``--baseline`` seconds with
   no job creation, (b) while the largest allowed job is created ``--jobs``
   times, one after the other (a request counts in (b) if it started between the
   first creation's start and the last one's answer) and (c) for ``--after``
   seconds after that, while the relay and projectors take the new jobs in.

With ``--huge`` it also posts the sweep of issue 10 (100,000 distinct algorithm
names, a 1 MB body) and reports its answer and time (the byte cap refuses it).

Results: a table on stdout and bench/results/bigjob-<date>[-<label>].json. For a
before/after ratio, run this same script from a checkout of the old code with
``--label before``, then here with ``--before <that json>``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
from http_client import Connection
from psycopg import sql
from run import DATABASE_URL, ROOT, log, percentile, tadpole_up

sys.path.insert(0, str(ROOT))

from domain.jobs import CreateJob
from domain.jobs.sweeps import Range, Sweep
from domain.processor import CommandProcessor
from eventstore.store import StorePort
from service.settings import Settings
from service.wiring import open_store

BYTE_CAP = 256 * 1024
TASKS = 100_000


def largest_sweep(cap: int = BYTE_CAP) -> Sweep:
    """100,000 tasks (20,000 algorithms × 5 iterations), canonical JSON just under ``cap``."""
    n_alg, width = 20_000, 1

    def build(w: int) -> Sweep:
        return Sweep(
            "/bench/noop.jar",
            "bench.Noop",
            tuple(f"A{n:0{w}d}" for n in range(n_alg)),
            Range(1, 5, 1),
            Range(1, 1, 1),
            Range(1, 1, 1),
        )

    while len(build(width + 1).to_json()) <= cap:
        width += 1
    sweep = build(width)
    assert sweep.total_tasks == TASKS
    return sweep


def as_body(sweep: Sweep) -> dict[str, Any]:
    def rng(r: Range) -> dict[str, int]:
        return {"min": r.min, "max": r.max, "step": r.step}

    return {
        "jarPath": sweep.jar_path,
        "mainClass": sweep.main_class,
        "algorithms": list(sweep.algorithms),
        "iterations": rng(sweep.iterations),
        "agents": rng(sweep.agents),
        "dimension": rng(sweep.dimension),
    }


def huge_body() -> dict[str, Any]:
    """Issue 10's request: 100,000 distinct algorithm names, one value each else."""
    one = {"min": 1, "max": 1, "step": 1}
    return {
        "jarPath": "/bench/noop.jar",
        "mainClass": "bench.Noop",
        "algorithms": [f"a{n:05d}" for n in range(TASKS)],  # 0.9 MB: under the 1 MiB body cap
        "iterations": one,
        "agents": one,
        "dimension": one,
    }


# ---- 1. the writer alone -------------------------------------------------------------------


def measure_writer(runs: int) -> dict[str, Any]:
    schema = f"bigjob{uuid4().hex[:8]}_store"
    store = open_store(Settings(database_url=DATABASE_URL, store_schema=schema))
    table = sql.Identifier(schema, store.recorder.events_table_name)
    sweep = largest_sweep()
    rows = []
    try:
        processor = CommandProcessor(StorePort(store), 3, 5.0)
        processor.process([], datetime.now(UTC))  # the first batch recovers: not measured
        for _ in range(runs):
            with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
                before = conn.execute(
                    sql.SQL("SELECT coalesce(sum(octet_length(state)), 0) FROM {}").format(table)
                ).fetchone()
            t0 = time.perf_counter()
            decided = processor.decide([CreateJob(sweep)], datetime.now(UTC))
            t1 = time.perf_counter()
            processor.store_decided(decided)
            t2 = time.perf_counter()
            with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
                after = conn.execute(
                    sql.SQL("SELECT coalesce(sum(octet_length(state)), 0) FROM {}").format(table)
                ).fetchone()
            assert before is not None and after is not None
            rows.append(
                {
                    "decide_ms": round((t1 - t0) * 1000, 1),
                    "store_ms": round((t2 - t1) * 1000, 1),
                    "events": len(decided.events),
                    "stored_bytes": int(after[0]) - int(before[0]),
                }
            )
            log(f"writer: {rows[-1]}")
    finally:
        store.close()
        with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    return {
        "sweep_bytes": len(sweep.to_json()),
        "tasks": sweep.total_tasks,
        "runs": rows,
        "decide_ms_median": sorted(r["decide_ms"] for r in rows)[len(rows) // 2],
        "store_ms_median": sorted(r["store_ms"] for r in rows)[len(rows) // 2],
        "total_ms_median": sorted(r["decide_ms"] + r["store_ms"] for r in rows)[len(rows) // 2],
    }


# ---- 2. the stack ----------------------------------------------------------------------------


@dataclass
class Samples:
    """(start time, latency ms) per kind of request."""

    by_kind: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    errors: int = 0

    def add(self, kind: str, started: float, status: int) -> None:
        self.by_kind.setdefault(kind, []).append((started, (time.perf_counter() - started) * 1000))
        if status >= 500:
            self.errors += 1

    def summary(self, start: float, end: float) -> dict[str, dict[str, float]]:
        out = {}
        for kind, samples in sorted(self.by_kind.items()):
            ms = [latency for t, latency in samples if start <= t < end]
            out[kind] = {
                "n": len(ms),
                "p50_ms": round(percentile(ms, 0.5), 1),
                "p99_ms": round(percentile(ms, 0.99), 1),
                "max_ms": round(max(ms, default=0.0), 1),
            }
        return out


async def timed(
    samples: Samples, kind: str, conn: Connection, path: str, body: Any
) -> tuple[int, Any]:
    t0 = time.perf_counter()
    status, answer = await conn.request("POST", path, body)
    samples.add(kind, t0, status)
    return status, answer


async def worker(port: int, samples: Samples, stop: asyncio.Event, pace: float) -> None:
    conn, beats = Connection("127.0.0.1", port), Connection("127.0.0.1", port)
    _, hello = await conn.request("POST", "/internal/v1/hello", {"ipAddress": "127.0.0.1"})
    spot = hello["spotId"]

    async def heartbeat() -> None:
        body = {"spotId": spot, "cpuLoad": 1.0, "runningTasks": 1, "totalCores": 2}
        while not stop.is_set():
            await timed(samples, "heartbeat", beats, "/internal/v1/heartbeat", body)
            await asyncio.sleep(1.0)

    beat = asyncio.create_task(heartbeat())
    try:
        while not stop.is_set():
            _, answer = await timed(
                samples, "claim", conn, "/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": 5}
            )
            for task in answer.get("tasks", []):
                body = {"spotId": spot, "runtimeMs": 0, "iter": 1, "fopt": 0.0}
                body["fenceToken"] = task["fenceToken"]
                path = f"/internal/v1/tasks/{task['id']}/complete"
                await timed(samples, "complete", conn, path, body)
            await asyncio.sleep(pace)
    finally:
        beat.cancel()
        conn.close()
        beats.close()


async def greeter(port: int, samples: Samples, stop: asyncio.Event) -> None:
    conn = Connection("127.0.0.1", port)
    while not stop.is_set():
        await timed(samples, "hello", conn, "/internal/v1/hello", {"ipAddress": "127.0.0.2"})
        await asyncio.sleep(0.5)
    conn.close()


async def drive(port: int, args: argparse.Namespace) -> dict[str, Any]:
    samples, stop = Samples(), asyncio.Event()
    creator = Connection("127.0.0.1", port)
    work = {
        "jarPath": "/bench/noop.jar",
        "mainClass": "bench.Noop",
        "algorithms": ["NOOP"],
        "iterations": {"min": 1, "max": 50_000, "step": 1},
        "agents": {"min": 1, "max": 1, "step": 1},
        "dimension": {"min": 1, "max": 1, "step": 1},
    }
    status, _ = await creator.request("POST", "/api/v1/jobs", work)
    assert status == 201, status
    clients = [
        asyncio.create_task(worker(port, samples, stop, args.pace)) for _ in range(args.workers)
    ]
    clients.append(asyncio.create_task(greeter(port, samples, stop)))
    await asyncio.sleep(2)  # connections open, first claims made: not measured
    base_start = time.perf_counter()
    await asyncio.sleep(args.baseline)
    base_end = time.perf_counter()

    body = as_body(largest_sweep())
    creations = []
    for _ in range(args.jobs):
        t0 = time.perf_counter()
        status, answer = await creator.request("POST", "/api/v1/jobs", body)
        creations.append(
            {
                "status": status,
                "ms": round((time.perf_counter() - t0) * 1000, 1),
                "answer": answer if status != 201 else None,
            }
        )
        log(f"big job: {creations[-1]}")
    load_end = time.perf_counter()
    await asyncio.sleep(args.after)
    after_end = time.perf_counter()
    huge = None
    if args.huge:
        t0 = time.perf_counter()
        status, answer = await creator.request("POST", "/api/v1/jobs", huge_body())
        huge = {"status": status, "ms": round((time.perf_counter() - t0) * 1000, 1)}
        huge["error"] = answer.get("error") if isinstance(answer, dict) else None
        log(f"issue 10's 1 MB sweep: {huge}")
    stop.set()
    await asyncio.gather(*clients, return_exceptions=True)
    creator.close()
    return {
        "baseline": samples.summary(base_start, base_end),
        "baseline_s": round(base_end - base_start, 1),
        "creating": samples.summary(base_end, load_end),
        "creating_s": round(load_end - base_end, 1),
        "after": samples.summary(load_end, after_end),
        "after_s": round(after_end - load_end, 1),
        "creations": creations,
        "huge": huge,
        "server_errors": samples.errors,
    }


def measure_stack(args: argparse.Namespace) -> dict[str, Any]:
    with tadpole_up("bigjob") as (_, base):
        return asyncio.run(drive(int(base.rsplit(":", 1)[1]), args))


# ---- report ------------------------------------------------------------------------------------


def table(report: dict[str, Any], before: dict[str, Any] | None) -> str:
    lines = []
    w = report.get("writer")
    if w:
        lines.append(
            f"writer, CreateJob of {w['tasks']} tasks, sweep {w['sweep_bytes']} B "
            f"(median of {len(w['runs'])}): decide {w['decide_ms_median']} ms, "
            f"store {w['store_ms_median']} ms, stored {w['runs'][0]['stored_bytes']:,} B"
        )
        bw = (before or {}).get("writer")
        if bw:
            lines.append(
                f"  before: decide {bw['decide_ms_median']} ms, store {bw['store_ms_median']} ms, "
                f"stored {bw['runs'][0]['stored_bytes']:,} B; total ratio before/after "
                f"{bw['total_ms_median'] / w['total_ms_median']:.1f}x"
            )
    s = report.get("stack")
    if s:
        lines.append(
            f"stack: baseline {s['baseline_s']} s; creating {len(s['creations'])} big jobs "
            f"{s['creating_s']} s ({', '.join(str(c['ms']) for c in s['creations'])} ms each)"
        )
        head = f"{'request':<10} {'phase':<9} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"
        bs = (before or {}).get("stack")
        if bs:
            head += f" {'before p50':>10} {'before p99':>10} {'before max':>10}"
        lines.append(head)
        for kind in sorted(s["baseline"]):
            for phase in ("baseline", "creating", "after"):
                row = s[phase].get(kind, {"n": 0, "p50_ms": 0, "p99_ms": 0, "max_ms": 0})
                line = (
                    f"{kind:<10} {phase:<9} {row['n']:>6} {row['p50_ms']:>8} "
                    f"{row['p99_ms']:>8} {row['max_ms']:>8}"
                )
                if bs:
                    old = bs[phase].get(kind, {"p50_ms": 0, "p99_ms": 0, "max_ms": 0})
                    line += f" {old['p50_ms']:>10} {old['p99_ms']:>10} {old['max_ms']:>10}"
                lines.append(line)
        if s.get("huge"):
            lines.append(f"issue 10's 1 MB sweep: {s['huge']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=4, help="spots (default 4)")
    parser.add_argument(
        "--pace", type=float, default=0.05, help="s a spot waits after each claim (default 0.05)"
    )
    parser.add_argument("--baseline", type=float, default=10, help="s without jobs (default 10)")
    parser.add_argument("--jobs", type=int, default=5, help="big jobs created (default 5)")
    parser.add_argument(
        "--after", type=float, default=5, help="s measured after the last job (default 5)"
    )
    parser.add_argument("--writer-runs", type=int, default=3, help="writer-alone runs (default 3)")
    parser.add_argument("--no-writer", action="store_true", help="skip the writer-alone phase")
    parser.add_argument("--no-stack", action="store_true", help="skip the stack phase")
    parser.add_argument("--huge", action="store_true", help="also post issue 10's 1 MB sweep")
    parser.add_argument("--label", default="", help="suffix of the results file")
    parser.add_argument("--before", type=Path, help="results of the old code, for ratios")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tree": str(ROOT),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if not args.no_writer:
        report["writer"] = measure_writer(args.writer_runs)
    if not args.no_stack:
        report["stack"] = measure_stack(args)
    before = json.loads(args.before.read_text()) if args.before else None
    if before:
        report["before"] = before
    suffix = f"-{args.label}" if args.label else ""
    out = ROOT / "bench" / "results" / f"bigjob-{time.strftime('%Y-%m-%d')}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report, before))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
