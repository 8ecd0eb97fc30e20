"""Infrastructure faults against servers of the test's own: a Redis killed and
restarted empty, a PostgreSQL restarted and crashed.

Each test starts its own Redis or PostgreSQL server on a free port (the
machine's binaries, the test's temporary directory), so it can kill and restart
it without touching the servers the machine and other tests use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from eventstore.store import TadpoleStore
from service.settings import load_settings
from service.wiring import store_env
from tests.e2e.conftest import Stack, free_port, health, http, wait_for
from tests.e2e.fleet import Fleet, lease_violations, sweep
from tests.e2e.test_stack import _converges, _job_done

pytestmark = pytest.mark.e2e

REDIS_SERVER = shutil.which("redis-server")


class OwnRedis:
    """A memory-only Redis on a free port, killed and started again at will."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return client.ping() is True
            except redis.ConnectionError:
                return False

        try:
            wait_for(answers, 10, "our Redis to answer")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if REDIS_SERVER is None:
        pytest.skip("no redis-server binary on this machine")
    server = OwnRedis(tmp_path)
    try:
        server.start()
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill()


def test_a_redis_killed_and_restarted_empty_never_breaks_a_read(
    make_stack: Any, own_redis: OwnRedis
) -> None:
    stack: Stack = make_stack()
    stack.env["REDIS_URL"] = own_redis.url
    stack.start()
    status, created = http("POST", stack.base + "/api/v1/jobs", sweep(4))
    assert status == 201, created
    job = created["jobId"]
    _, spot = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.1"})
    _, claimed = http(
        "POST", stack.base + "/internal/v1/tasks/claim", {"spotId": spot["spotId"], "maxTasks": 3}
    )
    for task in claimed["tasks"]:
        body = {"spotId": spot["spotId"], "fopt": 0.5, "fenceToken": task["fenceToken"]}
        assert http("POST", f"{stack.base}/internal/v1/tasks/{task['id']}/complete", body)[0] == 200
    expected = {"status": "RUNNING", "totalTasks": 4, "completedTasks": 3, "failedTasks": 0}

    def shown() -> dict[str, Any]:
        status, body = http("GET", f"{stack.base}/api/v1/jobs/{job}")
        assert status == 200, (status, body)  # never 404 or 500 for a job that exists
        return {k: body[k] for k in expected}

    wait_for(lambda: shown() == expected, 30, "the job's counts")

    own_redis.kill()
    assert shown() == expected  # from PostgreSQL
    down = health(stack)
    assert (down["database"], down["redis"], down["status"]) == (
        "connected",
        "disconnected",
        "degraded",
    )
    assert (down["activeSpots"], down["runningTasks"], down["pendingTasks"]) == (1, 0, 1)
    # a command while Redis is down is stored, and shows once it is back
    assert http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.2"})[0] == 200

    own_redis.start()  # empty: this Redis keeps nothing
    seen: list[dict[str, Any]] = []

    def back() -> bool:
        seen.append(shown())
        h = health(stack)
        return bool(h["redis"] == "connected" and h["activeSpots"] == 2)

    wait_for(back, 60, "Redis to be rebuilt with the spot stored while it was down")
    assert all(s == expected for s in seen), seen
    client = redis.Redis.from_url(own_redis.url)
    with contextlib.closing(client):
        assert client.exists(f"{stack.extra['name']}:job:{job}") == 1  # rebuilt, not PG
    assert shown() == expected


PG_BIN = Path("/usr/lib/postgresql/15/bin")


class OwnPostgres:
    """A PostgreSQL cluster of the test's own (run as the ``postgres`` user), on a free
    port: restarted and crashed at will.

    The postmaster is this test's child (through ``runuser``), not a daemon: this
    machine's PID 1 reaps no orphans, and a dead daemon left as a zombie would
    seem to hold its lock files.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tadpole-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def create(self) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(PG_BIN / "initdb"), "-D", str(self.data),
             "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip
        self.start()

    def start(self) -> None:
        with (self.dir / "log").open("ab") as log:
            self.process = subprocess.Popen(
                ["runuser", "-u", "postgres", "--", str(PG_BIN / "postgres"), "-D",
                 str(self.data), "-p", str(self.port), "-k", str(self.dir),
                 "-c", "listen_addresses=127.0.0.1"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def answers() -> bool:
            try:
                psycopg.connect(self.url, connect_timeout=2).close()
            except psycopg.OperationalError:
                return False
            return True

        wait_for(answers, 60, "our PostgreSQL to answer")

    def postmaster(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def restart(self) -> None:
        """A fast shutdown and a start: connections are closed, what was committed stays."""
        assert self.process is not None
        os.kill(self.postmaster(), signal.SIGINT)
        self.process.wait(60)
        self.start()

    def crash(self) -> None:
        """kill -9 of the postmaster and every backend, then a start: crash recovery."""
        assert self.process is not None
        postmaster = self.postmaster()
        doomed = [postmaster, *children(postmaster)]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(60)
        wait_for(lambda: not any(alive(pid) for pid in doomed), 30, "the cluster to be gone")
        self.start()

    def destroy(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.kill(self.postmaster(), signal.SIGQUIT)  # immediate shutdown
            self.process.wait(60)
        with contextlib.suppress(OSError):  # shown with a failed test's output
            print("".join((self.dir / "log").read_text().splitlines(keepends=True)[-15:]))
        shutil.rmtree(self.dir, ignore_errors=True)


def children(parent: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("no PostgreSQL 15 binaries or runuser on this machine")
    server = OwnPostgres()
    try:
        server.create()
        yield server
    finally:
        server.destroy()


def test_a_postgresql_restarted_and_crashed_under_load_loses_nothing(
    make_stack: Any, own_postgres: OwnPostgres
) -> None:
    stack: Stack = make_stack()
    stack.env.update(
        DATABASE_URL=own_postgres.url, TADPOLE_SPOT_TIMEOUT="3", TADPOLE_SPOT_REAPER_INTERVAL="1"
    )
    stack.start()
    status, created = http("POST", stack.base + "/api/v1/jobs", sweep(2000))
    assert status == 201
    job_id = created["jobId"]
    fleet = Fleet(stack.base, spots=6)
    fleet.start()
    try:
        wait_for(lambda: len(fleet.acknowledged) > 300, 60, "load before the restart")
        own_postgres.restart()
        after_restart = len(fleet.acknowledged)
        wait_for(lambda: len(fleet.acknowledged) > after_restart + 300, 60, "load after it")
        own_postgres.crash()
        after_crash = len(fleet.acknowledged)
        wait_for(lambda: len(fleet.acknowledged) > after_crash + 300, 60, "load after the crash")
        try:
            wait_for(lambda: _job_done(stack, job_id, 2000), 180, "the job to finish")
        except AssertionError:  # show what is left, and where
            with psycopg.connect(own_postgres.url) as conn:
                rows = conn.execute(
                    f"SELECT status, assigned_to, attempts, fence_token, count(*) FROM "
                    f"{stack.extra['name']}_read.tasks WHERE status <> 'DONE' "
                    "GROUP BY 1, 2, 3, 4"
                ).fetchall()
                spots = conn.execute(
                    f"SELECT id, status, last_heartbeat FROM {stack.extra['name']}_read.spots"
                ).fetchall()
            print("NOT DONE", rows, spots, http("GET", f"{stack.base}/api/v1/jobs/{job_id}"))
            print("HEALTH", http("GET", f"{stack.base}/api/v1/health"))
            raise
    finally:
        fleet.join()
    assert len(fleet.acknowledged) == 2000

    # every acknowledged completion is in the store, once, and in both read models
    def results() -> set[str]:
        status, body = http("GET", f"{stack.base}/api/v1/jobs/{job_id}/results")
        return {r["taskId"] for r in body["results"]} if status == 200 else set()

    # (the PostgreSQL read model may still be catching up after its own restarts)
    wait_for(lambda: results() == fleet.acknowledged, 60, "every completion in the results")
    store = TadpoleStore(store_env(load_settings(stack.env)))
    try:
        events = [store.mapper.to_domain_event(n) for n in store.notifications(0, 100_000)]
    finally:
        store.close()
    assert lease_violations(events) == []
    _converges(stack, stack.extra["name"] + "y")
