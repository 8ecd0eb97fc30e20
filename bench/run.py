"""Tadpole's throughput benchmark, beside PgQueuer and DBOS in the same run.

1. Starts `tadpole up` (embedded broker, fresh schemas) on a free port.
2. Creates the jobs (rate reported apart), then drains them with ``--workers``
   spots over seed 003's HTTP API (bench/load.py): claims of up to 5, one
   complete per request, keep-alive asyncio clients, heartbeats every 3 s.
3. Reads the projectors' event-created → read-model-applied lag samples
   (p50, p99) and PostgreSQL's commit counter (commits per task).
4. Runs bench/peers.py (PgQueuer, DBOS: the same number of no-op tasks, 2 worker
   processes) from the peers' own virtualenv, and reports ratios.

Run with `make bench`; results go to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import redis

ROOT = Path(__file__).resolve().parents[1]
PEERS_PY = ROOT / "bench" / ".venv-peers" / "bin" / "python"
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(base: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "/api/v1/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("tadpole up did not become healthy")


def commits() -> int:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
        assert row is not None
        return int(row[0])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def deployment(prefix: str) -> tuple[str, int, dict[str, str]]:
    """A fresh name (store and read schemas, Redis prefix, topic prefix), a free port,
    and the environment that points `tadpole up` at them (embedded broker)."""
    name = f"{prefix}{uuid4().hex[:8]}"
    port = free_port()
    env = {
        **os.environ,
        "TADPOLE_PORT": str(port),
        "TADPOLE_SCHEMA": f"{name}_store",
        "TADPOLE_READ_SCHEMA": f"{name}_read",
        "TADPOLE_REDIS_PREFIX": name,
        "TADPOLE_TOPIC_PREFIX": name,
        "TADPOLE_LOG_LEVEL": "WARNING",
    }
    env.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    return name, port, env


def start_stack(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`tadpole up` in its own session, its output discarded."""
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_stack(stack: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int | None:
    """Stop `tadpole up` with ``sig``: its exit code, or None if it had to be killed."""
    stack.send_signal(sig)
    try:
        return stack.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(stack.pid, signal.SIGKILL)
        stack.wait()
        return None


@contextlib.contextmanager
def tadpole_up(prefix: str) -> Iterator[tuple[str, str]]:
    """`tadpole up` on a free port with fresh schemas, keys and topics: ``(name, base URL)``.

    Healthy, with both projectors' consumer groups joined; stopped and dropped after.
    """
    name, port, env = deployment(prefix)
    base = f"http://127.0.0.1:{port}"
    log(f"starting tadpole up on {base} ({name})")
    stack = start_stack(env)
    try:
        wait_healthy(base)
        time.sleep(4)  # let both projectors' consumer groups finish joining
        yield name, base
    finally:
        stop_stack(stack)
        cleanup(name)


def run_tadpole(tasks: int, workers: int) -> dict[str, Any]:
    with tadpole_up("bench") as (name, base):
        before = commits()  # (includes the jobs' creation: commits per task err high)
        load = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "load.py"),
                "--base",
                base,
                "--tasks",
                str(tasks),
                "--workers",
                str(workers),
                "--claim",
                "5",
                "--reset-lag",
                name,
                "--warmup",
                "5000",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
        result: dict[str, Any] = json.loads(load.stdout.strip().splitlines()[-1])
        result["pg_commits_per_task"] = round((commits() - before) / tasks, 2)
        r = redis.Redis.from_url(REDIS_URL, decode_responses=True)
        for model in ("relay", "postgres", "redis"):
            samples = [float(x) for x in r.lrange(f"{name}:metrics:lag_ms:{model}", 0, -1)]
            result[f"lag_{model}_p50_ms"] = round(percentile(samples, 0.5), 1)
            result[f"lag_{model}_p99_ms"] = round(percentile(samples, 0.99), 1)
            result[f"lag_{model}_samples"] = len(samples)
        return result


def cleanup(name: str) -> None:
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}_store" CASCADE')
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}_read" CASCADE')
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        r.delete(*keys)


def run_peers(tasks: int) -> list[dict[str, Any]]:
    if not PEERS_PY.exists():
        log("bench/.venv-peers is missing: run `make bench` (it creates it)")
        return []
    log("running PgQueuer and DBOS (bench/peers.py)")
    out = subprocess.run(
        [
            str(PEERS_PY),
            str(ROOT / "bench" / "peers.py"),
            "--tasks",
            str(tasks),
            "--workers",
            "2",
            "--peer",
            "all",
            "--json",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tasks", type=int, default=20000, help="tasks for Tadpole (default 20000)"
    )
    parser.add_argument(
        "--peer-tasks", type=int, default=10000, help="tasks for each peer (default 10000)"
    )
    parser.add_argument("--workers", type=int, default=24, help="Tadpole spots (default 24)")
    parser.add_argument("--no-peers", action="store_true", help="skip PgQueuer and DBOS")
    args = parser.parse_args()

    tadpole = run_tadpole(args.tasks, args.workers)
    peers = [] if args.no_peers else run_peers(args.peer_tasks)
    report = {
        "machine": f"{platform.node()} {os.cpu_count()} cores, {platform.platform()}",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tadpole": tadpole,
        "peers": peers,
        "ratios": {
            p["peer"]: round(tadpole["drain_per_s"] / p["drain_per_s"], 2)
            for p in peers
            if p.get("drain_per_s")
        },
    }
    out = ROOT / "bench" / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
