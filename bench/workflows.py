"""3-step chain workflows run by 24 workers over Tadpole's HTTP API, beside DBOS Transact.

Issue 12, item 11: runs/s, and the step-to-step latency — a step's complete
acknowledged → the next step of the same run handed to a worker — p50/p99.
Must: at least 2× DBOS's runs/s and step-to-step p99 under 50 ms; aim 10× DBOS.

Tadpole (the project's venv):

1. `tadpole up` on a free port with its own store and read schemas, Redis prefix
   and topic prefix (bench/run.py's ``deployment``/``start_stack``), healthy, its
   projectors' consumer groups joined.
2. ``POST /api/v1/workflows`` registers ``bench/chain3``: step1 → step2 → step3,
   no-op payloads, the default retry policy, no timeout.
3. ``--workers`` spots (default 24) in ``--procs`` load processes (default 2), each
   spot a coroutine with its own keep-alive connection (bench/http_client.py, on
   uvloop): hello, then a loop of ``POST /internal/v1/tasks/claim`` with
   ``maxTasks`` 1 and ``waitMs`` (a long poll), and ``POST .../complete`` with
   ``output`` ``{}`` for each task; a heartbeat every 3 s on a second connection.
4. Warm-up: ``--warmup`` runs, unmeasured.
5. **Backlog phase** (the runs/s figure): ``--runs`` runs (default 2,000) started
   all at once up front, by ``--starters`` (16) concurrent connections sending
   ``POST /api/v1/workflows/bench/chain3/runs`` back to back, while the spots are
   already waiting. runs/s = runs / (first start sent → last step3's complete
   acknowledged). A run is done when a worker's complete of its step3 is
   acknowledged (the run turns COMPLETED in the same stored batch); a sample of
   ``--sample`` runs is then read back with ``GET /api/v1/workflow-runs/{id}``
   and must be COMPLETED with each step DONE in one attempt.
6. **Paced phase** (the latency figure with waiting workers): ``--paced-runs``
   runs started at a steady ``--paced-rate`` runs/s (default: half the backlog
   phase's runs/s), so that most of the time every next step finds a spot
   already long-polling. Its runs/s is just the offered rate.

Step-to-step latency: every load process stamps, with the machine-wide
monotonic clock, when each complete was acknowledged and when each claim's
answer arrived; per run, step k's ack → step k+1's claim answer, over both
transitions of every run (2 per run). When a spot's claim was already queued,
the next step is handed out by the very batch that stores the completion, and
both answers leave together: the sample is then ~0, give or take the two load
processes' own scheduling (seen down to -15 ms on two busy cores); samples are
kept as measured, negative ones too. Also reported: start acknowledged → step1
handed out (in the backlog phase, mostly the backlog itself), and the HTTP
latency of starts and completes.

Beside the figures, for each phase: CPU seconds used by each process of the
stack, by PostgreSQL and Redis (all their processes: other users of the servers
count too), by the load processes, irq + softirq time (loopback traffic is
mostly handled there, charged to no process), and the rest of the machine
(other users); the machine's busy fraction and load average.

DBOS Transact (bench/.venv-peers, bench/workflows_dbos.py): the same 3 no-op steps
as one DBOS workflow, ``--runs`` runs, 24-way concurrency, on the same
PostgreSQL, in two modes (see that file): ``direct`` (2 processes × 12 threads,
each thread calling the workflow back to back) and ``queue`` (a client
enqueues, 2 DBOS worker processes with ``worker_concurrency`` 12 dequeue). The
ratio is taken against the faster of the two.

Run with `make bench-workflows`; results go to bench/results/workflows-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import uvloop
from http_client import Connection
from run import (
    PEERS_PY,
    ROOT,
    cleanup,
    deployment,
    log,
    percentile,
    start_stack,
    stop_stack,
    wait_healthy,
)

NAMESPACE, WORKFLOW = "bench", "chain3"
STEPS = ("step1", "step2", "step3")
TICKS = os.sysconf("SC_CLK_TCK")


def now() -> float:
    """The machine-wide monotonic clock (the same in every process)."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def definition() -> dict[str, Any]:
    tasks, previous = [], []
    for step in STEPS:
        tasks.append({"id": step, "dependsOn": previous, "payload": {"op": "noop"}})
        previous = [step]
    return {"namespace": NAMESPACE, "name": WORKFLOW, "version": "1", "tasks": tasks}


def address(base: str) -> tuple[str, int]:
    url = urlsplit(base)
    return url.hostname or "127.0.0.1", url.port or 80


# ---- the load processes (this file with --load-proc) -------------------------------------------


async def load_proc(base: str, spots: int, wait_ms: int, claim_next: bool) -> None:
    """``spots`` spots claiming and completing until told to stop on stdin.

    Writes ``ready`` once every spot said hello, ``D`` for each run whose last
    step's complete was acknowledged, and at the end ``R`` with every record
    ``[instanceId, step, claim answered, complete acknowledged]`` and counters.
    """
    host, port = address(base)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    records: list[tuple[str, str, float, float]] = []
    counters = {
        "claims": 0,
        "empty_claims": 0,
        "claim_errors": 0,
        "refused_completes": 0,
        "tasks_with_report": 0,
    }
    claim_ms: list[float] = []
    complete_ms: list[float] = []
    out = sys.stdout

    def emit(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    def watch_stdin() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        loop.call_soon_threadsafe(stopping.set)

    async def hello(conn: Connection) -> str:
        status, body = await conn.request("POST", "/internal/v1/hello", {"ipAddress": "127.0.0.1"})
        if status != 200:
            raise SystemExit(f"hello: {status} {body}")
        spot_id: str = body["spotId"]
        return spot_id

    async def heartbeat(spot_id: str) -> None:
        conn = Connection(host, port)
        body = {"spotId": spot_id, "ipAddress": "127.0.0.1", "cpuLoad": 1.0, "totalCores": 2}
        try:
            while True:
                await conn.request("POST", "/internal/v1/heartbeat", body)
                await asyncio.sleep(3)
        finally:
            conn.close()

    async def work(conn: Connection, spot_id: str) -> None:
        claim = {"spotId": spot_id, "maxTasks": 1, "waitMs": wait_ms}
        held: list[tuple[dict[str, Any], float]] = []  # tasks in hand, and when they came
        while True:
            if not held:
                sent = now()
                status, answer = await conn.request("POST", "/internal/v1/tasks/claim", claim)
                got = now()
                counters["claims"] += 1
                if status != 200:
                    counters["claim_errors"] += 1
                    await asyncio.sleep(0.05)
                    continue
                if not answer["tasks"]:
                    counters["empty_claims"] += 1
                    continue
                claim_ms.append((got - sent) * 1000)
                held = [(task, got) for task in answer["tasks"]]
            task, got = held.pop(0)
            payload = orjson.loads(task["payload"])
            body = {"spotId": spot_id, "fenceToken": task["fenceToken"], "output": {}}
            if claim_next:  # as the reference worker: the report claims for the slot it frees
                body["claimNext"] = 1
            sent = now()
            status, answer = await conn.request(
                "POST", f"/internal/v1/tasks/{task['id']}/complete", body
            )
            acked = now()
            held += [(t, acked) for t in answer.get("tasks", [])]
            counters["tasks_with_report"] += len(answer.get("tasks", []))
            if status != 200:
                counters["refused_completes"] += 1
                continue
            complete_ms.append((acked - sent) * 1000)
            records.append((payload["instanceId"], payload["taskId"], got, acked))
            if payload["taskId"] == STEPS[-1]:
                emit(f"D {payload['instanceId']}")

    conns = [Connection(host, port) for _ in range(spots)]
    ids = [await hello(c) for c in conns]
    beats = [asyncio.create_task(heartbeat(s)) for s in ids]
    threading.Thread(target=watch_stdin, daemon=True).start()
    cpu0 = time.process_time()
    workers = [asyncio.create_task(work(c, s)) for c, s in zip(conns, ids, strict=True)]
    emit("ready")
    await stopping.wait()
    for t in [*workers, *beats]:
        t.cancel()
    await asyncio.gather(*workers, *beats, return_exceptions=True)
    for c in conns:
        c.close()
    emit(
        "R "
        + orjson.dumps(
            {
                "records": records,
                "counters": counters,
                "claim_ms": claim_ms,
                "complete_ms": complete_ms,
                "cpu_s": time.process_time() - cpu0,
            }
        ).decode()
    )


# ---- the driver ----------------------------------------------------------------------------------


class Loads:
    """The load processes: started, told to stop, their ``D`` lines counted."""

    def __init__(self) -> None:
        self.procs: list[asyncio.subprocess.Process] = []
        self.done: set[str] = set()
        self.changed = asyncio.Event()
        self.results: list[dict[str, Any]] = []
        self.readers: list[asyncio.Task[None]] = []

    async def start(
        self, base: str, workers: int, procs: int, wait_ms: int, claim_next: bool
    ) -> None:
        shares = [workers // procs + (1 if i < workers % procs else 0) for i in range(procs)]
        for share in shares:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(Path(__file__).resolve()),
                "--load-proc",
                "--base",
                base,
                "--workers",
                str(share),
                "--wait-ms",
                str(wait_ms),
                *([] if claim_next else ["--no-claim-next"]),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 28,
            )
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise SystemExit(f"a load process did not start: {line!r}")
            self.readers.append(asyncio.create_task(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            if raw.startswith(b"D "):
                self.done.add(raw[2:].strip().decode())
                self.changed.set()
            elif raw.startswith(b"R "):
                self.results.append(orjson.loads(raw[2:]))
                self.changed.set()

    async def wait_done(self, instances: set[str], timeout: float, label: str) -> None:
        deadline = now() + timeout
        last_report = now()
        while not instances <= self.done:
            if any(p.returncode is not None for p in self.procs):
                raise SystemExit("a load process exited early")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)
            if now() > deadline:
                missing = len(instances - self.done)
                raise SystemExit(f"{label}: {missing} runs not done after {timeout:.0f} s")
            if now() - last_report >= 2:
                last_report = now()
                log(f"  {label}: {len(instances & self.done)}/{len(instances)} runs done")

    async def stop(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(b"stop\n")
            await proc.stdin.drain()
        await asyncio.wait_for(asyncio.gather(*self.readers), 120)
        for proc in self.procs:
            await proc.wait()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()


async def start_runs(
    base: str, prefix: str, count: int, starters: int, rate: float | None
) -> dict[str, dict[str, float]]:
    """Start ``count`` runs (back to back, or at ``rate`` runs/s): instance → sent, acked."""
    host, port = address(base)
    started: dict[str, dict[str, float]] = {}
    issued = 0
    t0 = now()

    async def starter() -> None:
        nonlocal issued
        conn = Connection(host, port)
        try:
            while issued < count:
                i = issued
                issued += 1
                if rate:
                    delay = t0 + i / rate - now()
                    if delay > 0:
                        await asyncio.sleep(delay)
                body = {"runId": f"{prefix}-{i}", "input": {"i": i}}
                sent = now()
                status, answer = await conn.request(
                    "POST", f"/api/v1/workflows/{NAMESPACE}/{WORKFLOW}/runs", body
                )
                acked = now()
                if status != 201:
                    raise SystemExit(f"start failed: {status} {answer}")
                started[answer["instanceId"]] = {"sent": sent, "acked": acked}
        finally:
            conn.close()

    await asyncio.gather(*(starter() for _ in range(starters)))
    return started


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.5), 2),
        "p99_ms": round(percentile(values, 0.99), 2),
        "max_ms": round(max(values), 2) if values else 0.0,
        "min_ms": round(min(values), 2) if values else 0.0,
        "samples": len(values),
    }


def phase_figures(started: dict[str, dict[str, float]], records: list[list[Any]]) -> dict[str, Any]:
    """Runs/s and latencies of one phase's runs, from the load processes' records."""
    steps: dict[str, dict[str, tuple[float, float]]] = {}
    for instance, step, got, acked in records:
        if instance in started:
            steps.setdefault(instance, {})[step] = (got, acked)
    transitions: list[float] = []
    first_step: list[float] = []
    last_ack = 0.0
    incomplete = 0
    for instance, times in started.items():
        run = steps.get(instance, {})
        if len(run) != len(STEPS):
            incomplete += 1
            continue
        first_step.append((run[STEPS[0]][0] - times["acked"]) * 1000)
        for before, after in itertools.pairwise(STEPS):
            transitions.append((run[after][0] - run[before][1]) * 1000)
        last_ack = max(last_ack, run[STEPS[-1]][1])
    first_sent = min(t["sent"] for t in started.values())
    last_start = max(t["acked"] for t in started.values())
    elapsed = last_ack - first_sent
    return {
        "runs": len(started),
        "incomplete": incomplete,
        "seconds": round(elapsed, 3),
        "runs_per_s": round(len(started) / elapsed, 1),
        "steps_per_s": round(len(started) * len(STEPS) / elapsed, 1),
        "start_phase_seconds": round(last_start - first_sent, 3),
        "step_to_step": summarize(transitions),
        "start_to_first_step": summarize(first_step),
        "start_request": summarize([(t["acked"] - t["sent"]) * 1000 for t in started.values()]),
    }


async def check_sample(base: str, instances: list[str], size: int) -> dict[str, Any]:
    host, port = address(base)
    conn = Connection(host, port)
    sample = random.sample(instances, min(size, len(instances)))
    good = 0
    bad: list[Any] = []
    try:
        for instance in sample:
            status, run = await conn.request("GET", f"/api/v1/workflow-runs/{instance}")
            ok = (
                status == 200
                and run["state"] == "COMPLETED"
                and [(t["taskId"], t["state"], t["attempts"]) for t in run["tasks"]]
                == [(s, "DONE", 1) for s in STEPS]
            )
            if ok:
                good += 1
            else:
                bad.append(run)
    finally:
        conn.close()
    if bad:
        log(f"runs not COMPLETED as expected: {bad[:3]}")
    return {"checked": len(sample), "completed": good}


# ---- CPU accounting --------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, str, float] | None:
    """(parent, comm, CPU seconds) of a process, None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / TICKS


def _label(pid: int, comm: str) -> str:
    """What a process of the stack is: api, relay, projector-postgres..., or its name."""
    try:
        words = [
            w.decode(errors="replace")
            for w in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if w
        ]
    except OSError:
        return comm
    if any("gunicorn" in w for w in words):
        return "api (gunicorn)"
    if "service.cli" in words:
        rest = words[words.index("service.cli") + 1 :]
        return "tadpole " + " ".join(rest[:2])
    return comm


def cpu_snapshot(stack_pid: int, load_pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of the stack's processes, PostgreSQL, and the load processes."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            s = _stat(int(entry))
            if s is not None:
                stats[int(entry)] = s
    tree: dict[int, list[int]] = {}
    for pid, (parent, _, _) in stats.items():
        tree.setdefault(parent, []).append(pid)
    out: dict[str, float] = {}
    frontier = [stack_pid]
    stack_pids = set()
    while frontier:
        pid = frontier.pop()
        stack_pids.add(pid)
        frontier += tree.get(pid, [])
    for pid in stack_pids:
        if pid in stats:
            _, comm, cpu = stats[pid]
            key = _label(pid, comm)
            out[key] = out.get(key, 0.0) + cpu
    out["postgresql (all)"] = sum(c for _, comm, c in stats.values() if comm == "postgres")
    out["redis-server (all)"] = sum(c for _, comm, c in stats.values() if comm == "redis-server")
    out["load processes"] = sum(stats[p][2] for p in load_pids if p in stats)
    out["driver (starts)"] = time.process_time()
    return out


def machine_busy() -> tuple[float, float, float]:
    """(busy, total, interrupts) jiffies of the machine so far; interrupts are irq + softirq,
    which no process is charged with (on loopback, much of the network stack's work)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total, fields[5] + fields[6]


def cpu_figures(
    cpu0: dict[str, float],
    cpu1: dict[str, float],
    busy0: tuple[float, float, float],
    busy1: tuple[float, float, float],
    runs: int,
) -> dict[str, Any]:
    """The machine's busy fraction and each process's CPU, in all and per run, over a phase."""
    cpu = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 3) for k in cpu1}
    cpu["irq + softirq"] = round((busy1[2] - busy0[2]) / TICKS, 3)
    # Everything else that ran: kernel threads, other users of the machine.
    busy_s = (busy1[0] - busy0[0]) / TICKS
    cpu["rest of the machine"] = round(busy_s - sum(cpu.values()), 3)
    ordered = sorted(cpu.items(), key=lambda kv: -kv[1])
    return {
        "machine_busy_fraction": round((busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 3),
        "cpu_seconds": dict(ordered),
        "cpu_ms_per_run": {k: round(v * 1000 / runs, 3) for k, v in ordered},
    }


# ---- Tadpole ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def stack_up(prefix: str) -> Iterator[tuple[str, str, subprocess.Popen[bytes]]]:
    """`tadpole up` with fresh names on a free port: (name, base URL, the process)."""
    name, port, env = deployment(prefix)
    base = f"http://127.0.0.1:{port}"
    log(f"starting tadpole up on {base} ({name})")
    stack = start_stack(env)
    try:
        wait_healthy(base)
        time.sleep(4)  # let both projectors' consumer groups finish joining
        yield name, base, stack
    finally:
        stop_stack(stack)
        cleanup(name)


async def tadpole(args: argparse.Namespace, base: str, stack_pid: int) -> dict[str, Any]:
    host, port = address(base)
    conn = Connection(host, port)
    status, body = await conn.request("POST", "/api/v1/workflows", definition())
    conn.close()
    if status not in (200, 201):
        raise SystemExit(f"registering the workflow: {status} {body}")
    loads = Loads()
    try:
        await loads.start(base, args.workers, args.procs, args.wait_ms, not args.no_claim_next)
        load_pids = [p.pid for p in loads.procs]
        if args.warmup:
            log(f"warm-up: {args.warmup} runs")
            warm = await start_runs(base, "warm", args.warmup, args.starters, None)
            await loads.wait_done(set(warm), 300, "warm-up")
        await asyncio.sleep(1)

        log(f"backlog phase: {args.runs} runs started up front, {args.workers} workers")
        load_avg = os.getloadavg()
        cpu0, busy0, t0 = cpu_snapshot(stack_pid, load_pids), machine_busy(), now()
        backlog = await start_runs(base, "backlog", args.runs, args.starters, None)
        await loads.wait_done(set(backlog), 900, "backlog")
        cpu1, busy1, window_s = cpu_snapshot(stack_pid, load_pids), machine_busy(), now() - t0

        paced: dict[str, dict[str, float]] = {}
        rate = None
        if args.paced_runs:
            await asyncio.sleep(1)
            # Half the backlog's rate unless given (the exact runs/s is computed from the
            # records once the load processes hand them over; this is the driver's clock).
            rate = args.paced_rate or round(args.runs / window_s / 2, 1)
            log(f"paced phase: {args.paced_runs} runs at {rate} runs/s")
            pcpu0, pbusy0 = cpu_snapshot(stack_pid, load_pids), machine_busy()
            paced = await start_runs(base, "paced", args.paced_runs, args.starters, rate)
            await loads.wait_done(set(paced), 900, "paced")
            pcpu1, pbusy1 = cpu_snapshot(stack_pid, load_pids), machine_busy()
        await loads.stop()
    finally:
        loads.kill()

    records = [r for result in loads.results for r in result["records"]]
    counters: dict[str, float] = {}
    for result in loads.results:
        for k, v in result["counters"].items():
            counters[k] = counters.get(k, 0) + v
    backlog_fig = phase_figures(backlog, records)
    backlog_fig.update(
        {
            "load_average_before": [round(x, 2) for x in load_avg],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            **cpu_figures(cpu0, cpu1, busy0, busy1, args.runs),
        }
    )
    out: dict[str, Any] = {
        "peer": "tadpole",
        "workers": args.workers,
        "load_processes": args.procs,
        "wait_ms": args.wait_ms,
        "claim_next": not args.no_claim_next,
        "starters": args.starters,
        "backlog": backlog_fig,
        "claim_with_task_incl_long_poll_wait": summarize(
            [x for r in loads.results for x in r["claim_ms"]]
        ),
        "complete_request": summarize([x for r in loads.results for x in r["complete_ms"]]),
        "counters": counters,
        "load_cpu_s": round(sum(r["cpu_s"] for r in loads.results), 2),
    }
    if paced:
        fig = phase_figures(paced, records)
        fig["offered_rate"] = rate
        fig.update(cpu_figures(pcpu0, pcpu1, pbusy0, pbusy1, args.paced_runs))
        out["paced"] = fig
    out["sample"] = await check_sample(base, list(backlog), args.sample)
    return out


# ---- DBOS ------------------------------------------------------------------------------------------


def dbos(args: argparse.Namespace) -> list[dict[str, Any]]:
    if not PEERS_PY.exists():
        log("bench/.venv-peers is missing: `make bench/.venv-peers/.installed` creates it")
        return []
    results = []
    for mode in args.dbos_modes.split(","):
        log(f"DBOS ({mode}): {args.runs} runs of 3 steps, 24-way")
        proc = subprocess.run(
            [
                str(PEERS_PY),
                str(ROOT / "bench" / "workflows_dbos.py"),
                "--runs",
                str(args.runs),
                "--concurrency",
                str(args.workers),
                "--mode",
                mode,
                "--json",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
        if proc.returncode != 0 or not lines:
            log(f"DBOS ({mode}) failed with exit code {proc.returncode}")
            continue
        results.extend(lines)
    return results


# ---- report ----------------------------------------------------------------------------------------


def others(phase: dict[str, Any]) -> float:
    """The share of the machine that other users took during a phase."""
    rest: float = phase["cpu_seconds"].get("rest of the machine", 0.0)
    return max(0.0, rest) / phase["seconds"] / (os.cpu_count() or 1)


def table(report: dict[str, Any]) -> str:
    t = report["tadpole"]
    b = t["backlog"]
    rows = [
        ("Tadpole, backlog: runs/s", f"{b['runs_per_s']:,.0f}"),
        ("  steps/s", f"{b['steps_per_s']:,.0f}"),
        (
            "  step-to-step p50 / p99 ms",
            f"{b['step_to_step']['p50_ms']} / {b['step_to_step']['p99_ms']}",
        ),
        (
            "  start ack → step1 handed out p50 / p99 ms",
            f"{b['start_to_first_step']['p50_ms']} / {b['start_to_first_step']['p99_ms']}",
        ),
        (
            "  start request p50 / p99 ms",
            f"{b['start_request']['p50_ms']} / {b['start_request']['p99_ms']}",
        ),
        (
            "  machine busy; others' share; load average before",
            f"{b['machine_busy_fraction']:.0%}; {others(b):.0%}; {b['load_average_before'][0]}",
        ),
    ]
    if "paced" in t:
        p = t["paced"]
        rows += [
            (f"Tadpole, paced at {p['offered_rate']} runs/s: runs/s", f"{p['runs_per_s']:,.0f}"),
            (
                "  step-to-step p50 / p99 ms",
                f"{p['step_to_step']['p50_ms']} / {p['step_to_step']['p99_ms']}",
            ),
            (
                "  start ack → step1 handed out p50 / p99 ms",
                f"{p['start_to_first_step']['p50_ms']} / {p['start_to_first_step']['p99_ms']}",
            ),
            (
                "  machine busy; others' share",
                f"{p['machine_busy_fraction']:.0%}; {others(p):.0%}",
            ),
        ]
    for d in report["dbos"]:
        rows += [
            (f"DBOS {d['version']} ({d['mode']}): runs/s", f"{d['runs_per_s']:,.0f}"),
            (
                "  step-to-step p50 / p99 ms",
                f"{d['step_to_step']['p50_ms']} / {d['step_to_step']['p99_ms']}",
            ),
            (
                "  machine busy; others' share",
                f"{d['machine_busy_fraction']:.0%}; {d['others_share']:.0%}",
            ),
        ]
    if report.get("ratio") is not None:
        rows.append(("Tadpole ÷ DBOS (faster mode), runs/s", f"{report['ratio']:.2f}"))
    rows.append(("must (≥ 2× DBOS, step-to-step p99 < 50 ms)", report["must"]))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000, help="runs per phase and peer (2000)")
    parser.add_argument("--workers", type=int, default=24, help="Tadpole spots; DBOS's concurrency")
    parser.add_argument("--procs", type=int, default=2, help="load processes for the spots (2)")
    parser.add_argument("--wait-ms", type=int, default=5000, help="claims' waitMs (5000)")
    parser.add_argument(
        "--no-claim-next",
        action="store_true",
        help="complete without claimNext (a claim request for every task)",
    )
    parser.add_argument("--starters", type=int, default=16, help="connections starting runs (16)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured runs first (200)")
    parser.add_argument("--sample", type=int, default=50, help="runs read back at the end (50)")
    parser.add_argument(
        "--paced-runs", type=int, default=1000, help="runs of the paced phase (1000; 0: none)"
    )
    parser.add_argument(
        "--paced-rate", type=float, default=0, help="runs/s of the paced phase (half the backlog's)"
    )
    parser.add_argument("--no-dbos", action="store_true", help="skip DBOS")
    parser.add_argument(
        "--dbos-modes", default="direct,queue", help="DBOS modes to run (direct,queue)"
    )
    parser.add_argument("--label", default="", help="appended to the results file's name")
    parser.add_argument("--load-proc", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.load_proc:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us
        uvloop.run(load_proc(args.base, args.workers, args.wait_ms, not args.no_claim_next))
        return

    with stack_up("wfb") as (_, base, stack):
        tadpole_result = uvloop.run(tadpole(args, base, stack.pid))
    dbos_results = [] if args.no_dbos else dbos(args)
    best = max((d["runs_per_s"] for d in dbos_results), default=None)
    ratio = round(tadpole_result["backlog"]["runs_per_s"] / best, 2) if best else None
    p99s = [tadpole_result["backlog"]["step_to_step"]["p99_ms"]]
    if "paced" in tadpole_result:
        p99s.append(tadpole_result["paced"]["step_to_step"]["p99_ms"])
    latency_ok = max(p99s) < 50
    if ratio is None:
        must = "latency " + ("holds" if latency_ok else "MISSED") + "; no DBOS figure"
    elif ratio >= 2 and latency_ok:
        must = f"holds ({ratio:.1f}× DBOS, p99 {max(p99s)} ms)"
    else:
        must = f"MISSED ({ratio:.1f}× DBOS, p99 {max(p99s)} ms)"
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tadpole": tadpole_result,
        "dbos": dbos_results,
        "ratio": ratio,
        "must": must,
    }
    out = (
        ROOT
        / "bench"
        / "results"
        / (f"workflows-{time.strftime('%Y-%m-%d')}{'-' + args.label if args.label else ''}.json")
    )
    out.parent.mkdir(exist_ok=True)
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    runs.append(report)
    out.write_text(json.dumps({"what": "bench/workflows.py", "runs": runs}, indent=2) + "\n")
    print(table(report))
    log(f"written to {out.relative_to(ROOT)} (run {len(runs)} of the file)")


if __name__ == "__main__":
    main()
