"""Peer benchmark: how fast PgQueuer and DBOS Transact drain no-op tasks on this machine.

Tadpole's own benchmark reports its figures as ratios against these peers, measured in
the same run on the same PostgreSQL, so that machine speed cancels out.

Method, the same for each peer:

1. Create a fresh database (``bench_<peer>_<random>``) on the server named by
   ``--database-url`` and install the peer's schema in it; it is dropped at the end,
   whatever happens, so nothing collides with other users of the server.
2. Enqueue ``--tasks`` no-op tasks, ONE library call each (no batch API), from this
   process. That phase is timed on its own (``enqueue_seconds``); no worker runs yet.
3. Start ``--workers`` worker processes. Each imports its library and registers its
   handler, then reports ready and waits. Once all are ready the drain clock starts and
   every worker is told to go; from then on a worker connects/launches and drains.
   So ``drain_seconds`` covers the peer's own worker start-up (connect, ``DBOS.launch``)
   but not Python's interpreter start or imports.
4. The drain clock stops when this process, polling the peer's own tables every
   ``POLL_INTERVAL_S``, sees all tasks done (PgQueuer: its queue table is empty, as a
   finished job's row is deleted when its buffered status is flushed; DBOS: every
   workflow's status row is ``SUCCESS``). A failed task aborts the run.

How each peer is used (its documented fast path, nothing patched):

* PgQueuer: one ``QueueManager`` per worker process on an asyncpg connection under
  uvloop (what ``pgq run`` does), ``batch_size`` 10 per dequeue, default buffered
  status/heartbeat writes, default (durable, logged) tables; an ``async`` no-op entrypoint.
  Enqueue is ``Queries.enqueue(entrypoint, None)`` per task.
* DBOS: each task is a durable workflow that runs one step. The queue is registered in
  the system database with ``DBOSClient.register_queue`` (a per-process
  ``worker_concurrency`` and a ``polling_interval_sec``, both flags); each worker is a DBOS
  process (own ``executor_id``) listening on it. Enqueue is ``DBOSClient.enqueue`` per task.

Every phase is bounded by ``--timeout`` (per peer); worker processes also exit on their
own when their stdin closes (i.e. when this process goes away) or on their own deadline.

Usage (own venv, see bench/README-peers.md)::

    bench/.venv-peers/bin/python bench/peers.py --tasks 10000 --workers 2 --peer all --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PEERS = ("pgqueuer", "dbos")
POLL_INTERVAL_S = 0.05  # pacing of the completion poll, i.e. the drain clock's resolution
PROGRESS_EVERY_S = 1.0
WORKER_STOP_GRACE_S = 10.0

PGQ_ENTRYPOINT = "bench_noop"
DBOS_APP_NAME = "tadpole-peer-bench"
DBOS_APP_VERSION = "bench-1"
DBOS_QUEUE = "bench_queue"
DBOS_WORKFLOW = "bench_noop_workflow"
DBOS_STEP = "bench_noop_step"
DBOS_FAILED_STATUSES = ("ERROR", "CANCELLED", "MAX_RECOVERY_ATTEMPTS_EXCEEDED")


class BenchError(RuntimeError):
    """A peer run failed (timeout, worker died, task failed)."""


@dataclasses.dataclass(frozen=True)
class Settings:
    tasks: int
    workers: int
    database_url: str
    timeout_s: float
    pgq_batch_size: int
    dbos_worker_concurrency: int
    dbos_polling_interval_s: float


@dataclasses.dataclass
class PeerResult:
    peer: str
    version: str
    tasks: int
    workers: int
    enqueue_seconds: float
    enqueue_per_s: float
    drain_seconds: float
    drain_per_s: float
    settings: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("enqueue_seconds", "drain_seconds"):
            out[key] = round(out[key], 4)
        for key in ("enqueue_per_s", "drain_per_s"):
            out[key] = round(out[key], 1)
        return out


def log(msg: str) -> None:
    print(f"[peers {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Deadline:
    """A wall-clock budget shared by every phase of one peer's run."""

    def __init__(self, seconds: float, what: str) -> None:
        self.at = time.monotonic() + seconds
        self.seconds = seconds
        self.what = what

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self, doing: str) -> None:
        if self.remaining() <= 0:
            raise BenchError(f"{self.what}: timed out after {self.seconds:.0f} s while {doing}")


class Progress:
    """Prints ``label: done/total`` to stderr at most once per PROGRESS_EVERY_S."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.started = time.perf_counter()
        self.last = self.started

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            elapsed = now - self.started
            rate = done / elapsed if elapsed > 0 else 0.0
            log(f"{self.label}: {done}/{self.total} ({elapsed:.1f} s, {rate:.0f}/s)")


# --------------------------------------------------------------------------- databases


def database_url_for(base_url: str, dbname: str) -> str:
    parts = urlsplit(base_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{dbname}", parts.query, parts.fragment))


@contextmanager
def scratch_database(base_url: str, peer: str) -> Iterator[str]:
    """Create ``bench_<peer>_<random>`` and yield its URL; always drop it afterwards."""
    dbname = f"bench_{peer}_{secrets.token_hex(4)}"
    with psycopg.connect(base_url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    log(f"{peer}: created database {dbname}")
    try:
        yield database_url_for(base_url, dbname)
    finally:
        try:
            with psycopg.connect(base_url, autocommit=True, connect_timeout=10) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            log(f"{peer}: dropped database {dbname}")
        except psycopg.Error as exc:  # never mask the run's own outcome
            log(f"{peer}: could not drop database {dbname}: {exc}")


# --------------------------------------------------------------------------- workers


class WorkerPool:
    """``count`` worker processes running this file in ``--worker PEER`` mode.

    Protocol on the worker's stdin/stdout: the worker writes ``ready`` once imported and
    set up; the parent writes ``go`` to start draining; closing stdin tells it to stop.
    """

    def __init__(self, peer: str, count: int, extra_args: list[str], deadline: Deadline) -> None:
        self.peer = peer
        self.procs: list[subprocess.Popen[str]] = []
        worker_timeout = max(deadline.remaining(), 1.0) + 30.0
        for index in range(count):
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--worker",
                peer,
                "--worker-index",
                str(index),
                "--worker-timeout",
                f"{worker_timeout:.0f}",
                *extra_args,
            ]
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=None,  # worker diagnostics go straight to our stderr
                    text=True,
                    bufsize=1,
                )
            )

    def wait_ready(self, deadline: Deadline) -> None:
        for index, proc in enumerate(self.procs):
            line = self._read_line(proc, deadline)
            if line != "ready":
                raise BenchError(f"{self.peer} worker {index}: expected 'ready', got {line!r}")

    def _read_line(self, proc: subprocess.Popen[str], deadline: Deadline) -> str:
        assert proc.stdout is not None
        while True:
            deadline.check(f"waiting for {self.peer} workers to start")
            readable, _, _ = select.select([proc.stdout], [], [], min(1.0, deadline.remaining()))
            if readable:
                line = proc.stdout.readline()
                if not line:
                    raise BenchError(
                        f"{self.peer} worker exited during start-up (code {proc.wait()})"
                    )
                return line.strip()

    def go(self) -> None:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def check_alive(self) -> None:
        for index, proc in enumerate(self.procs):
            code = proc.poll()
            if code is not None:
                raise BenchError(f"{self.peer} worker {index} exited early with code {code}")

    def stop(self) -> None:
        """Close stdin (asks workers to stop), then terminate / kill stragglers."""
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                with suppress(OSError):
                    proc.stdin.close()
        until = time.monotonic() + WORKER_STOP_GRACE_S
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, until - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def drain(
    peer: str,
    settings: Settings,
    url: str,
    worker_args: list[str],
    count_done: Callable[[psycopg.Connection[Any]], int],
    deadline: Deadline,
) -> float:
    """Start the workers, time until ``count_done`` reaches ``settings.tasks``."""
    pool = WorkerPool(peer, settings.workers, ["--database-url", url, *worker_args], deadline)
    try:
        pool.wait_ready(deadline)
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            progress = Progress(f"{peer} drain", settings.tasks)
            started = time.perf_counter()
            pool.go()
            while True:
                done = count_done(conn)
                now = time.perf_counter()
                if done >= settings.tasks:
                    elapsed = now - started
                    progress.update(done, force=True)
                    return elapsed
                progress.update(done)
                pool.check_alive()
                deadline.check(f"draining ({done}/{settings.tasks} done)")
                time.sleep(POLL_INTERVAL_S)  # pacing between polls; the clock is the poll
    finally:
        pool.stop()


# --------------------------------------------------------------------------- PgQueuer


def run_pgqueuer(settings: Settings) -> PeerResult:
    deadline = Deadline(settings.timeout_s, "pgqueuer")
    with scratch_database(settings.database_url, "pgqueuer") as url:
        enqueue_s = asyncio.run(
            asyncio.wait_for(pgq_enqueue(url, settings.tasks), deadline.remaining())
        )

        def count_done(conn: psycopg.Connection[Any]) -> int:
            # A finished job's row leaves the queue table when its buffered status is flushed.
            row = conn.execute("SELECT count(*) FROM pgqueuer").fetchone()
            assert row is not None
            return settings.tasks - int(row[0])

        drain_s = drain(
            "pgqueuer",
            settings,
            url,
            ["--pgq-batch-size", str(settings.pgq_batch_size)],
            count_done,
            deadline,
        )
        pgq_check_no_failures(url)
    return PeerResult(
        peer="pgqueuer",
        version=importlib.metadata.version("pgqueuer"),
        tasks=settings.tasks,
        workers=settings.workers,
        enqueue_seconds=enqueue_s,
        enqueue_per_s=settings.tasks / enqueue_s,
        drain_seconds=drain_s,
        drain_per_s=settings.tasks / drain_s,
        settings={"driver": "asyncpg+uvloop", "batch_size": settings.pgq_batch_size},
    )


async def pgq_enqueue(url: str, tasks: int) -> float:
    import asyncpg
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    conn = await asyncpg.connect(url)
    try:
        queries = Queries(AsyncpgDriver(conn))
        await queries.install()
        progress = Progress("pgqueuer enqueue", tasks)
        started = time.perf_counter()
        for i in range(tasks):
            await queries.enqueue(PGQ_ENTRYPOINT, None)
            progress.update(i + 1)
        elapsed = time.perf_counter() - started
        progress.update(tasks, force=True)
        return elapsed
    finally:
        await conn.close()


def pgq_check_no_failures(url: str) -> None:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pgqueuer_log WHERE status NOT IN ('queued', 'picked', 'successful')"
        ).fetchone()
    if row is not None and int(row[0]) > 0:
        raise BenchError(f"pgqueuer: {row[0]} job(s) did not succeed")


def pgq_worker(args: argparse.Namespace, proto: IO[str]) -> None:
    import asyncpg
    import uvloop
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.qm import QueueManager
    from pgqueuer.queries import Queries

    proto.write("ready\n")
    proto.flush()
    if sys.stdin.readline().strip() != "go":
        return

    async def main() -> None:
        started = time.perf_counter()
        conn = await asyncpg.connect(args.database_url)
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint(PGQ_ENTRYPOINT)
        async def noop(job: Job) -> None:
            return None

        loop = asyncio.get_running_loop()
        stop_on_eof(lambda: loop.call_soon_threadsafe(qm.shutdown.set))
        worker_log(args, f"connected in {time.perf_counter() - started:.3f} s")
        try:
            await asyncio.wait_for(
                qm.run(batch_size=args.pgq_batch_size), timeout=args.worker_timeout
            )
        finally:
            await conn.close()

    uvloop.run(main())


# --------------------------------------------------------------------------- DBOS


def run_dbos(settings: Settings) -> PeerResult:
    deadline = Deadline(settings.timeout_s, "dbos")
    with scratch_database(settings.database_url, "dbos") as url:
        enqueue_s = dbos_enqueue(url, settings, deadline)
        failed_list = ", ".join(f"'{s}'" for s in DBOS_FAILED_STATUSES)

        def count_done(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'SUCCESS'),"
                f" count(*) FILTER (WHERE status IN ({failed_list}))"
                " FROM dbos.workflow_status WHERE name = %s",
                (DBOS_WORKFLOW,),
            ).fetchone()
            assert row is not None
            if int(row[1]) > 0:
                raise BenchError(f"dbos: {row[1]} workflow(s) failed")
            return int(row[0])

        drain_s = drain(
            "dbos",
            settings,
            url,
            [],
            count_done,
            deadline,
        )
    return PeerResult(
        peer="dbos",
        version=importlib.metadata.version("dbos"),
        tasks=settings.tasks,
        workers=settings.workers,
        enqueue_seconds=enqueue_s,
        enqueue_per_s=settings.tasks / enqueue_s,
        drain_seconds=drain_s,
        drain_per_s=settings.tasks / drain_s,
        settings={
            "workflow": "1 step",
            "worker_concurrency": settings.dbos_worker_concurrency,
            "polling_interval_sec": settings.dbos_polling_interval_s,
        },
    )


def dbos_enqueue(url: str, settings: Settings, deadline: Deadline) -> float:
    from dbos import DBOS, DBOSClient, EnqueueOptions

    DBOS.migrate(url)
    client = DBOSClient(system_database_url=url, application_name=DBOS_APP_NAME)
    try:
        client.register_queue(
            DBOS_QUEUE,
            worker_concurrency=settings.dbos_worker_concurrency,
            polling_interval_sec=settings.dbos_polling_interval_s,
            application_name=DBOS_APP_NAME,
        )
        options: EnqueueOptions = {
            "workflow_name": DBOS_WORKFLOW,
            "queue_name": DBOS_QUEUE,
            "app_version": DBOS_APP_VERSION,
        }
        progress = Progress("dbos enqueue", settings.tasks)
        started = time.perf_counter()
        for i in range(settings.tasks):
            client.enqueue(options, i)
            progress.update(i + 1)
            if i % 100 == 0:
                deadline.check("enqueueing")
        elapsed = time.perf_counter() - started
        progress.update(settings.tasks, force=True)
        return elapsed
    finally:
        client.destroy()


def dbos_worker(args: argparse.Namespace, proto: IO[str]) -> None:
    from dbos import DBOS, DBOSConfig

    @DBOS.step(name=DBOS_STEP)
    def noop_step(i: int) -> int:
        return i

    @DBOS.workflow(name=DBOS_WORKFLOW)
    def noop_workflow(i: int) -> int:
        return noop_step(i)

    config: DBOSConfig = {
        "name": DBOS_APP_NAME,
        "system_database_url": args.database_url,
        "application_version": DBOS_APP_VERSION,
        "executor_id": f"bench-worker-{args.worker_index}",
        "run_migrations": False,  # the parent migrated the fresh database
        "log_level": "WARNING",
    }
    DBOS(config=config)
    proto.write("ready\n")
    proto.flush()
    if sys.stdin.readline().strip() != "go":
        return
    started = time.perf_counter()
    DBOS.launch()
    worker_log(args, f"launched in {time.perf_counter() - started:.3f} s")
    stopped = threading.Event()
    stop_on_eof(stopped.set)
    stopped.wait(timeout=args.worker_timeout)
    DBOS.destroy(workflow_completion_timeout_sec=0)


# --------------------------------------------------------------------------- worker side


def worker_log(args: argparse.Namespace, msg: str) -> None:
    print(f"[{args.worker} worker {args.worker_index}] {msg}", file=sys.stderr, flush=True)


def stop_on_eof(stop: Callable[[], None]) -> None:
    """Call ``stop`` once stdin closes (the parent stopping us, or going away)."""

    def watch() -> None:
        while sys.stdin.readline():
            pass
        stop()

    threading.Thread(target=watch, name="stdin-eof", daemon=True).start()


def worker_main(args: argparse.Namespace) -> int:
    # Keep the protocol channel clean: the libraries' own output goes to stderr.
    proto = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if args.worker == "pgqueuer":
        pgq_worker(args, proto)
    else:
        dbos_worker(args, proto)
    return 0


# --------------------------------------------------------------------------- CLI


RUNNERS: dict[str, Callable[[Settings], PeerResult]] = {
    "pgqueuer": run_pgqueuer,
    "dbos": run_dbos,
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure how fast PgQueuer and DBOS drain no-op tasks (see module docstring).",
    )
    parser.add_argument("--tasks", type=positive_int, default=10_000, help="tasks per peer (10000)")
    parser.add_argument("--workers", type=positive_int, default=2, help="worker processes (2)")
    parser.add_argument(
        "--peer", choices=(*PEERS, "all"), default="all", help="peer(s) to run (all)"
    )
    parser.add_argument(
        "--database-url",
        default=DEFAULT_DATABASE_URL,
        help="server to use; a scratch database is created on it per peer (%(default)s)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per peer on stdout"
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=300.0, help="seconds allowed per peer (300)"
    )
    parser.add_argument(
        "--pgq-batch-size", type=positive_int, default=10, help="PgQueuer jobs per dequeue (10)"
    )
    parser.add_argument(
        "--dbos-worker-concurrency",
        type=positive_int,
        default=100,
        help="DBOS workflows in flight per worker process (100)",
    )
    parser.add_argument(
        "--dbos-polling-interval",
        type=positive_float,
        default=0.1,
        help="DBOS queue polling interval in seconds (0.1; DBOS's default is 1.0)",
    )
    # Internal: this file re-executed as a worker process.
    parser.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)

    def on_sigterm(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt  # unwind through the cleanup paths

    signal.signal(signal.SIGTERM, on_sigterm)
    settings = Settings(
        tasks=args.tasks,
        workers=args.workers,
        database_url=args.database_url,
        timeout_s=args.timeout,
        pgq_batch_size=args.pgq_batch_size,
        dbos_worker_concurrency=args.dbos_worker_concurrency,
        dbos_polling_interval_s=args.dbos_polling_interval,
    )
    peers = PEERS if args.peer == "all" else (args.peer,)
    failures = 0
    for peer in peers:
        log(f"{peer}: {settings.tasks} tasks, {settings.workers} workers")
        try:
            result = RUNNERS[peer](settings)
        except (TimeoutError, BenchError, psycopg.Error) as exc:
            failures += 1
            log(f"{peer}: FAILED: {exc}")
            continue
        log(
            f"{peer} {result.version}: enqueue {result.enqueue_per_s:,.0f}/s"
            f" ({result.enqueue_seconds:.2f} s), drain {result.drain_per_s:,.0f}/s"
            f" ({result.drain_seconds:.2f} s)"
        )
        if args.json:
            print(json.dumps(result.as_json()), flush=True)
        else:
            print(
                f"{peer:9} {result.version:8} tasks={result.tasks} workers={result.workers}"
                f"  enqueue {result.enqueue_per_s:8.0f}/s ({result.enqueue_seconds:.2f} s)"
                f"  drain {result.drain_per_s:8.0f}/s ({result.drain_seconds:.2f} s)",
                flush=True,
            )
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
