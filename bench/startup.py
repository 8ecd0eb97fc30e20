"""Start-up to healthy, and the API's memory, with 1,000 and 100,000 finished jobs.

Issue 11, item 5: both should stay flat, within 1.5x, between the two store sizes.
Only the public HTTP API and the bench helpers are used (bench/run.py starts the
stack, bench/load.py's spots drain it), so the script does not depend on how
domain/ is laid out.

For each ``--jobs`` count N (default 1,000 and 100,000):

1. Seed. A fresh deployment (bench/run.py: its own store and read schemas, Redis
   prefix, topic prefix and port, embedded broker) runs `tadpole up`. N one-task
   jobs (a 1x1x1x1 sweep) are created over POST /api/v1/jobs by ``--creators``
   concurrent keep-alive connections while ``--spots`` spots (bench/load.py's:
   claim up to ``--claim``, complete each, heartbeat every 3 s) finish them. Then
   it waits until GET /api/v1/health says "healthy" with no pending or running
   task, no spot up (the reaper has marked the seeding spots down, so nothing is
   left to happen in the store) and every pipeline step at ``storePosition``.
2. Restart ``--restarts`` times. SIGTERM to `tadpole up` (its exit code and the
   time it took are recorded), then `tadpole up` again on the same store, and:
   seconds from starting `tadpole up` until GET /ready answers 200 and until
   GET /api/v1/health answers "healthy"; the same from the start of the API's
   gunicorn master (its /proc start time, 10 ms resolution), which leaves out
   the embedded broker's start; the gunicorn worker's VmRSS right after /ready
   answers and after ``--idle`` s idle once healthy, and its VmHWM (peak RSS,
   which covers recovery); the CPU seconds the worker had used by /ready (less
   sensitive than the wall clock to whatever else the machine is doing); and
   the VmRSS of the whole `tadpole up` tree after the idle wait.
3. Median over the restarts per N, the ratio largest N / smallest N of each
   figure, a table on stdout, and bench/results/startup-<date>[-<label>].json.

The machine should be otherwise idle while it runs: the load average at each
restart is recorded beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import uvloop
from load import Counters, Server, spot, sweep
from run import ROOT, cleanup, deployment, log, start_stack, stop_stack, wait_healthy

STAGES = ("relay", "projector.postgres", "projector.redis")
TICKS = os.sysconf("SC_CLK_TCK")


def now() -> float:
    """Seconds since boot, the clock /proc/<pid>/stat's start times are on."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def get(url: str, timeout: float = 10.0) -> tuple[int, Any]:
    """Status and JSON body; (0, None) while nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return 0, None


# ---- processes --------------------------------------------------------------------------------


def parents() -> dict[int, int]:
    """pid → parent pid of every process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            out[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def descendants(pid: int) -> list[int]:
    tree = parents()
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, parent in tree.items() if parent == p]
        found += kids
        frontier += kids
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def api_processes(stack_pid: int) -> tuple[int, int] | None:
    """(gunicorn master, its worker) under `tadpole up`, once both exist."""
    tree = parents()
    for master, parent in tree.items():
        if parent == stack_pid and "gunicorn" in cmdline(master):
            workers = [w for w, p in tree.items() if p == master]
            if workers:
                return master, workers[0]
    return None


def status_kb(pid: int, field: str) -> int:
    """A ``kB`` figure (VmRSS, VmHWM) of /proc/<pid>/status; 0 if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def started_at(pid: int) -> float:
    """The process's start, in seconds since boot."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[19]) / TICKS


def cpu_s(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def mb(kb: int) -> float:
    return round(kb / 1024, 1)


# ---- 1. seeding -------------------------------------------------------------------------------


async def seed(base: str, jobs: int, creators: int, spots: int, claim: int) -> dict[str, Any]:
    """Create ``jobs`` one-task jobs and have spots finish every task."""
    server = Server(base)
    counters, done = Counters(), asyncio.Event()
    created: list[str] = []
    issued = 0

    async def creator() -> None:
        nonlocal issued
        conn = server.connect()
        body = sweep(1)
        try:
            while issued < jobs:
                issued += 1
                status, answer = await conn.request("POST", "/api/v1/jobs", body)
                if status != 201:
                    raise SystemExit(f"job creation failed: {status} {answer}")
                created.append(answer["jobId"])
        finally:
            conn.close()

    async def progress() -> None:
        t0 = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(5)
            s = time.perf_counter() - t0
            log(
                f"  {s:5.0f} s: {len(created):,}/{jobs:,} jobs created ({len(created) / s:,.0f}/s), "
                f"{counters.completed:,} tasks completed ({counters.completed / s:,.0f}/s)"
            )

    t0 = time.perf_counter()
    watcher = asyncio.create_task(progress())
    making = asyncio.gather(*(creator() for _ in range(creators)))
    finishing = asyncio.gather(*(spot(server, claim, jobs, counters, done) for _ in range(spots)))
    await making
    create_s = time.perf_counter() - t0
    await finishing
    seed_s = time.perf_counter() - t0
    watcher.cancel()
    if counters.errors or counters.completed != jobs:
        raise SystemExit(f"seeding: {counters.completed} completed, {counters.errors} refused")

    # A sample of the jobs, by id, must be DONE.
    conn, sample = server.connect(), created[:: max(1, len(created) // 50)]
    statuses = []
    for job in sample:
        _, answer = await conn.request("GET", f"/api/v1/jobs/{job}")
        statuses.append(answer.get("status"))
    conn.close()
    if statuses.count("DONE") != len(sample):
        raise SystemExit(f"seeded jobs not DONE: {statuses}")
    return {
        "jobs": len(created),
        "create_s": round(create_s, 1),
        "create_per_s": round(len(created) / create_s, 1),
        "seed_s": round(seed_s, 1),
        "claims": counters.claims,
        "empty_claims": counters.empty_claims,
        "sampled_done": len(sample),
    }


def settled(health: Any) -> bool:
    """Healthy, nothing pending, running or up, and every step at the store's position."""
    if not isinstance(health, dict) or health.get("status") != "healthy":
        return False
    pipeline = health.get("pipeline", {})
    return (
        health.get("pendingTasks") == 0
        and health.get("runningTasks") == 0
        and health.get("activeSpots") == 0
        and all(pipeline.get(s, {}).get("position") == health.get("storePosition") for s in STAGES)
    )


def wait_settled(base: str, timeout: float) -> tuple[float, dict[str, Any]]:
    t0 = time.monotonic()
    said = t0
    while True:
        _, health = get(base + "/api/v1/health")
        if settled(health):
            return time.monotonic() - t0, health
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"the store did not settle in {timeout:g} s: {health}")
        if time.monotonic() - said >= 5:
            said = time.monotonic()
            behind = {
                s: v.get("behindEvents") for s, v in (health or {}).get("pipeline", {}).items()
            }
            log(
                f"  settling: store at {(health or {}).get('storePosition')}, behind {behind}, "
                f"spots up {(health or {}).get('activeSpots')}, status {(health or {}).get('status')}"
            )
        time.sleep(0.5)


# ---- 2. restarts ------------------------------------------------------------------------------


def restart(env: dict[str, str], base: str, idle: float, timeout: float) -> dict[str, Any]:
    """Start `tadpole up` on the seeded store; time it to ready and healthy, read its memory."""
    load = os.getloadavg()[0]
    t0 = now()
    stack = start_stack(env)
    try:
        while (status := get(base + "/ready")[0]) != 200:
            if stack.poll() is not None:
                raise SystemExit(f"tadpole up exited with {stack.returncode}")
            if now() - t0 > timeout:
                raise SystemExit(f"/ready did not answer 200 in {timeout:g} s (last {status})")
            time.sleep(0.05)
        ready = now()
        found = api_processes(stack.pid)
        if found is None:
            raise SystemExit("no gunicorn worker under tadpole up")
        master, worker = found
        rss_ready, cpu_ready = status_kb(worker, "VmRSS"), cpu_s(worker)
        api_start = started_at(master)
        while (health := get(base + "/api/v1/health")[1] or {}).get("status") != "healthy":
            if now() - t0 > timeout:
                raise SystemExit(f"not healthy in {timeout:g} s: {health}")
            time.sleep(0.05)
        healthy = now()
        time.sleep(idle)
        figures: dict[str, Any] = {
            "ready_s": round(ready - t0, 2),
            "healthy_s": round(healthy - t0, 2),
            "api_ready_s": round(ready - api_start, 2),
            "api_healthy_s": round(healthy - api_start, 2),
            "worker_cpu_at_ready_s": round(cpu_ready, 2),
            "worker_rss_ready_mb": mb(rss_ready),
            "worker_rss_idle_mb": mb(status_kb(worker, "VmRSS")),
            "worker_peak_rss_mb": mb(status_kb(worker, "VmHWM")),
            "stack_rss_idle_mb": mb(
                sum(status_kb(p, "VmRSS") for p in [stack.pid, *descendants(stack.pid)])
            ),
            "load_avg_1m_before": round(load, 2),
            "worker_pid": worker,
        }
    finally:
        t1 = time.monotonic()
        code = stop_stack(stack, signal.SIGTERM)
        stop_s = time.monotonic() - t1
    figures["stop_s"] = round(stop_s, 2)
    figures["stop_exit_code"] = code
    return figures


FIGURES = {
    "ready_s": "tadpole up → /ready 200 (s)",
    "healthy_s": "tadpole up → health healthy (s)",
    "api_ready_s": "API process → /ready 200 (s)",
    "api_healthy_s": "API process → healthy (s)",
    "worker_cpu_at_ready_s": "API worker CPU used by ready (s)",
    "worker_rss_ready_mb": "API worker RSS at ready (MB)",
    "worker_rss_idle_mb": "API worker RSS idle (MB)",
    "worker_peak_rss_mb": "API worker peak RSS (MB)",
    "stack_rss_idle_mb": "whole stack RSS idle (MB)",
    "stop_s": "SIGTERM → stopped (s)",
}


def measure(jobs: int, args: argparse.Namespace) -> dict[str, Any]:
    name, port, env = deployment("startup")
    base = f"http://127.0.0.1:{port}"
    log(f"== {jobs:,} jobs: deployment {name} on {base}")
    result: dict[str, Any] = {"jobs": jobs, "deployment": name}
    try:
        stack = start_stack(env)
        try:
            wait_healthy(base)
            time.sleep(4)  # let both projectors' consumer groups finish joining
            log(f"seeding {jobs:,} finished one-task jobs")
            result["seed"] = uvloop.run(seed(base, jobs, args.creators, args.spots, args.claim))
            log(f"seeded in {result['seed']['seed_s']} s; waiting for the read models")
            settle_s, health = wait_settled(base, args.timeout)
            result["seed"]["settle_s"] = round(settle_s, 1)
            result["seed"]["store_position"] = health["storePosition"]
            log(f"settled in {settle_s:.1f} s at store position {health['storePosition']:,}")
        finally:
            result["seed_stop_exit_code"] = stop_stack(stack, signal.SIGTERM)
        runs = []
        for i in range(args.restarts):
            time.sleep(args.pause)
            runs.append(restart(env, base, args.idle, args.timeout))
            log(f"restart {i + 1}/{args.restarts}: {runs[-1]}")
        result["restarts"] = runs
        result["median"] = {k: round(statistics.median(r[k] for r in runs), 2) for k in FIGURES}
    finally:
        if not args.keep:
            cleanup(name)
    return result


def table(report: dict[str, Any]) -> str:
    results = report["results"]
    head = f"{'figure (median of ' + str(report['args']['restarts']) + ')':<36}"
    head += "".join(f"{format(r['jobs'], ',') + ' jobs':>14}" for r in results)
    if len(results) > 1:
        head += f"{'ratio':>8}"
    lines = [head]
    for key, label in FIGURES.items():
        line = f"{label:<36}" + "".join(f"{r['median'][key]:>14}" for r in results)
        if len(results) > 1:
            line += f"{report['ratios'][key]:>8}"
        lines.append(line)
    for r in results:
        s = r["seed"]
        lines.append(
            f"seeding {r['jobs']:,} jobs: {s['seed_s']} s ({s['create_per_s']:,} jobs/s created), "
            f"read models settled {s['settle_s']} s later; {s['store_position']:,} events"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--jobs",
        type=int,
        nargs="+",
        default=[1000, 100_000],
        help="finished jobs in the store, one deployment each (default 1000 100000)",
    )
    parser.add_argument(
        "--restarts", type=int, default=3, help="restarts measured per store (default 3)"
    )
    parser.add_argument(
        "--idle", type=float, default=5, help="s idle after healthy before RSS (default 5)"
    )
    parser.add_argument(
        "--pause", type=float, default=2, help="s between stopping and starting (default 2)"
    )
    parser.add_argument(
        "--creators", type=int, default=16, help="concurrent job-creating connections (default 16)"
    )
    parser.add_argument("--spots", type=int, default=8, help="seeding spots (default 8)")
    parser.add_argument(
        "--claim", type=int, default=100, help="maxTasks per claim when seeding (default 100)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="s allowed for any one wait (default 1800)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the schemas and Redis keys")
    parser.add_argument("--label", default="", help="suffix of the results file")
    args = parser.parse_args()

    report: dict[str, Any] = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tree": str(ROOT),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "args": vars(args),
        "results": [measure(n, args) for n in args.jobs],
    }
    low, high = report["results"][0]["median"], report["results"][-1]["median"]
    report["ratios"] = {k: round(high[k] / low[k], 2) if low[k] else None for k in FIGURES}
    report["flat_within_1_5x"] = {
        k: report["ratios"][k] is not None and report["ratios"][k] <= 1.5
        for k in ("ready_s", "healthy_s", "worker_rss_idle_mb")
    }
    suffix = f"-{args.label}" if args.label else ""
    out = ROOT / "bench" / "results" / f"startup-{time.strftime('%Y-%m-%d')}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
