"""DBOS Transact running bench/workflows.py's 3-step chain: runs/s and step-to-step latency.

The workflow is ``step1 → step2 → step3``, three no-op ``@DBOS.step``s in one
``@DBOS.workflow``: every step's output is checkpointed in PostgreSQL before the
next one runs, as Tadpole stores a step's completion before it hands out the
next. ``--runs`` runs, ``--concurrency`` (24) at a time, on a fresh database
(bench/peers.py's ``scratch_database``, dropped at the end) on the same server.

Two modes, both DBOS's documented ways to run workflows:

* ``direct``: ``--procs`` (2) DBOS processes of ``concurrency / procs`` threads
  each; every thread calls the workflow function back to back (a workflow call
  runs durably in the calling thread) until the process's share is done. No
  queue, no polling: the fastest DBOS gets on this machine. The clock runs from
  the first call to the last one returning, across processes.
* ``queue``: a ``DBOSClient`` in this process enqueues every run (one call each,
  as fast as it can) onto a queue registered with ``worker_concurrency``
  ``concurrency / procs`` and ``polling_interval_sec`` ``--polling-interval``
  (0.1 s; DBOS's default is 1 s), served by ``--procs`` launched DBOS worker
  processes. This is the shape closest to Tadpole's (a client starts runs,
  workers execute them). The clock runs from the first enqueue until every
  run's status row is ``SUCCESS`` (polled every 20 ms).

Beside the figures: the machine's busy fraction over the clock's window, the
workers' and PostgreSQL's CPU seconds, and ``others_share``, the share of the
machine that neither used (this driver, irq + softirq, other users).

Step-to-step latency, measured inside the workers: from step k's call returning
(its output recorded) to step k+1's body starting (after DBOS's check for a
recorded output), on the machine-wide monotonic clock.

Usage (the peers' venv): bench/.venv-peers/bin/python bench/workflows_dbos.py --mode direct
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import psycopg
from peers import BenchError, Deadline, log, scratch_database, stop_on_eof

APP = "tadpole-workflow-bench"
APP_VERSION = "bench-1"
QUEUE = "chain3_queue"
WORKFLOW = "bench_chain3"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


# ---- worker processes ------------------------------------------------------------------------------


def worker(args: argparse.Namespace, proto: IO[str]) -> None:
    from dbos import DBOS, DBOSConfig

    local = threading.local()
    latencies: list[float] = []

    def began() -> None:
        previous = getattr(local, "acked", None)
        if previous is not None:
            latencies.append((now() - previous) * 1000)
            local.acked = None

    @DBOS.step(name="step1")
    def step1(i: int) -> int:
        began()
        return i

    @DBOS.step(name="step2")
    def step2(i: int) -> int:
        began()
        return i

    @DBOS.step(name="step3")
    def step3(i: int) -> int:
        began()
        return i

    @DBOS.workflow(name=WORKFLOW)
    def chain(i: int) -> int:
        local.acked = None
        a = step1(i)
        local.acked = now()
        b = step2(a)
        local.acked = now()
        c = step3(b)
        local.acked = None
        return c

    config: DBOSConfig = {
        "name": APP,
        "system_database_url": args.database_url,
        "application_version": APP_VERSION,
        "executor_id": f"bench-{args.mode}-{args.index}",
        "run_migrations": False,  # the parent migrated the fresh database
        "log_level": "WARNING",
    }
    DBOS(config=config)
    DBOS.launch()
    proto.write("ready\n")
    proto.flush()
    if sys.stdin.readline().strip() != "go":
        return
    result: dict[str, Any] = {}
    cpu0 = time.process_time()
    if args.mode == "direct":
        counter = itertools.count()
        lock = threading.Lock()
        ends: list[float] = []
        start = now()

        def run() -> None:
            while True:
                with lock:
                    i = next(counter)
                if i >= args.share:
                    return
                chain(i)
                ends.append(now())

        threads = [threading.Thread(target=run) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result = {"first_start": start, "last_end": max(ends), "runs": len(ends)}
        proto.write("done\n")
        proto.flush()
    stopped = threading.Event()
    stop_on_eof(stopped.set)
    stopped.wait(timeout=args.worker_timeout)
    result.update({"latencies_ms": latencies, "cpu_s": time.process_time() - cpu0})
    proto.write("R " + json.dumps(result) + "\n")
    proto.flush()
    DBOS.destroy(workflow_completion_timeout_sec=0)


def worker_main(args: argparse.Namespace) -> int:
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the libraries' output goes to stderr
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker(args, proto)
    return 0


class Pool:
    def __init__(self, args: argparse.Namespace, url: str, deadline: Deadline) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        per = args.concurrency // args.procs
        for index in range(args.procs):
            share = args.runs // args.procs + (1 if index < args.runs % args.procs else 0)
            self.procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--worker",
                        "--mode",
                        args.mode,
                        "--index",
                        str(index),
                        "--threads",
                        str(per),
                        "--share",
                        str(share),
                        "--database-url",
                        url,
                        "--worker-timeout",
                        f"{deadline.remaining() + 30:.0f}",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    bufsize=1,
                )
            )

    def line(self, proc: subprocess.Popen[str], deadline: Deadline, doing: str) -> str:
        assert proc.stdout is not None
        while True:
            deadline.check(doing)
            ready, _, _ = select.select([proc.stdout], [], [], min(1.0, deadline.remaining()))
            if ready:
                text = proc.stdout.readline()
                if not text:
                    raise BenchError(f"a DBOS worker exited while {doing} ({proc.wait()})")
                return text.strip()

    def expect(self, word: str, deadline: Deadline, doing: str) -> None:
        for proc in self.procs:
            got = self.line(proc, deadline, doing)
            if got != word:
                raise BenchError(f"a DBOS worker said {got!r} while {doing}")

    def go(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def results(self, deadline: Deadline) -> list[dict[str, Any]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        out = []
        for proc in self.procs:
            got = self.line(proc, deadline, "collecting results")
            if not got.startswith("R "):
                raise BenchError(f"a DBOS worker said {got[:80]!r} instead of its results")
            out.append(json.loads(got[2:]))
        return out

    def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


TICKS = os.sysconf("SC_CLK_TCK")


def machine() -> tuple[float, float, float]:
    """(busy jiffies, total jiffies, CPU seconds of every postgres process) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy, total = sum(fields[:8]) - fields[3] - fields[4], sum(fields[:8])
    pg = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                raw = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if raw[raw.index("(") + 1 : raw.rindex(")")] == "postgres":
                f = raw.rsplit(")", 1)[1].split()
                pg += (int(f[11]) + int(f[12])) / TICKS
    return busy, total, pg


def count_done(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
        " count(*) FILTER (WHERE status IN ('ERROR', 'CANCELLED',"
        " 'MAX_RECOVERY_ATTEMPTS_EXCEEDED')) FROM dbos.workflow_status WHERE name = %s",
        (WORKFLOW,),
    ).fetchone()
    assert row is not None
    if int(row[1]):
        raise BenchError(f"{row[1]} DBOS workflows failed")
    return int(row[0])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from dbos import DBOS, DBOSClient, EnqueueOptions

    deadline = Deadline(args.timeout, f"dbos {args.mode}")
    with scratch_database(args.database_url, "dbosflow") as url:
        DBOS.migrate(url)
        client = None
        if args.mode == "queue":
            client = DBOSClient(system_database_url=url, application_name=APP)
            client.register_queue(
                QUEUE,
                worker_concurrency=args.concurrency // args.procs,
                polling_interval_sec=args.polling_interval,
                application_name=APP,
            )
        pool = Pool(args, url, deadline)
        try:
            pool.expect("ready", deadline, "launching")
            load_avg = os.getloadavg()
            before = machine()
            enqueue_s = None
            if args.mode == "direct":
                pool.go()
                pool.expect("done", deadline, "running the workflows")
                results = pool.results(deadline)
                first = min(r["first_start"] for r in results)
                last = max(r["last_end"] for r in results)
                elapsed = last - first
                done = sum(r["runs"] for r in results)
            else:
                assert client is not None
                pool.go()
                options: EnqueueOptions = {
                    "workflow_name": WORKFLOW,
                    "queue_name": QUEUE,
                    "app_version": APP_VERSION,
                }
                first = now()
                for i in range(args.runs):
                    client.enqueue(options, i)
                enqueue_s = now() - first
                with psycopg.connect(url, autocommit=True) as conn:
                    while (done := count_done(conn)) < args.runs:
                        deadline.check(f"waiting for the runs ({done}/{args.runs})")
                        time.sleep(0.02)
                    elapsed = now() - first
                results = pool.results(deadline)
            after = machine()
            with psycopg.connect(url, autocommit=True) as conn:
                succeeded = count_done(conn)
        finally:
            pool.stop()
            if client is not None:
                client.destroy()
    latencies = [x for r in results for x in r["latencies_ms"]]
    busy_s = (after[0] - before[0]) / TICKS
    workers_s = sum(r["cpu_s"] for r in results)
    # What neither the workers nor PostgreSQL used: this driver (the enqueuing client in queue
    # mode), irq + softirq (loopback traffic), other users of the machine.
    rest_s = busy_s - workers_s - (after[2] - before[2])
    ncpu = os.cpu_count() or 1
    settings: dict[str, Any] = {
        "processes": args.procs,
        "threads_or_worker_concurrency": args.concurrency // args.procs,
    }
    if args.mode == "queue":
        settings["polling_interval_sec"] = args.polling_interval
    return {
        "peer": "dbos",
        "version": importlib.metadata.version("dbos"),
        "mode": args.mode,
        "runs": args.runs,
        "concurrency": args.concurrency,
        "succeeded": succeeded,
        "completed_by_workers": done,
        "seconds": round(elapsed, 3),
        "runs_per_s": round(args.runs / elapsed, 1),
        "steps_per_s": round(3 * args.runs / elapsed, 1),
        "enqueue_seconds": round(enqueue_s, 3) if enqueue_s is not None else None,
        "step_to_step": {
            "p50_ms": round(percentile(latencies, 0.5), 2),
            "p99_ms": round(percentile(latencies, 0.99), 2),
            "max_ms": round(max(latencies), 2) if latencies else 0.0,
            "samples": len(latencies),
        },
        "worker_cpu_s": round(workers_s, 2),
        "postgresql_cpu_s": round(after[2] - before[2], 2),
        "machine_busy_fraction": round((after[0] - before[0]) / max(1, after[1] - before[1]), 3),
        "others_share": round(max(0.0, rest_s) / elapsed / ncpu, 3),
        "load_average_before": [round(x, 2) for x in load_avg],
        "settings": settings,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--mode", choices=("direct", "queue"), default="direct")
    parser.add_argument("--polling-interval", type=float, default=0.1)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=12, help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-timeout", type=float, default=600, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker_main(args)
    try:
        result = bench(args)
    except (TimeoutError, BenchError, psycopg.Error) as error:
        log(f"dbos {args.mode}: FAILED: {error}")
        return 1
    log(
        f"dbos {args.mode}: {result['runs_per_s']:,.0f} runs/s, step-to-step p50/p99 "
        f"{result['step_to_step']['p50_ms']}/{result['step_to_step']['p99_ms']} ms"
    )
    print(json.dumps(result) if args.json else json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
