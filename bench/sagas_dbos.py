"""DBOS Transact running bench/sagas.py's agent-spawning saga: sagas/s, and the time from
a failed step to its compensations done.

What a user would write instead of Tadpole's saga: one ``@DBOS.workflow`` calling three
``@DBOS.step``s — reserve resources on the target (a reservation row and the target's
usage, in one SQL transaction, refused past the target's cpu limit), initialize the
agent (an agent row), register it with the mesh (the mesh's member count and the
agent's mesh) — and, when one raises, the compensations of the steps done, in
reverse, each a step too (delete the reservation and give the usage back; mark the
agent terminated; leave the mesh). Every step's outcome is checkpointed by DBOS
before the next runs. ``--concurrency`` threads (16) call the workflow back to back
in one DBOS process (DBOS's direct mode, its fastest here), ``--sagas`` per phase,
on a fresh database on the same PostgreSQL. The failing phase makes ``register``
raise in ``--fail-rate`` (20%) of the sagas.

Usage (the peers' venv): bench/.venv-peers/bin/python bench/sagas_dbos.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import threading
import time
from typing import Any

import psycopg
from peers import log, scratch_database

SCHEMA = """
CREATE TABLE targets (id text PRIMARY KEY, cpu_limit bigint NOT NULL, cpu_used bigint NOT NULL,
                      workloads int NOT NULL);
CREATE TABLE reservations (agent text PRIMARY KEY, target text NOT NULL, cpu bigint NOT NULL);
CREATE TABLE agents (id text PRIMARY KEY, target text NOT NULL, mesh text, state text NOT NULL);
CREATE TABLE meshes (id text PRIMARY KEY, members int NOT NULL);
"""


class Refused(Exception):
    pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    with scratch_database(args.database_url, "dbossaga") as url:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(SCHEMA)
            for target in ("clean", "failing"):
                conn.execute("INSERT INTO targets VALUES (%s, %s, 0, 0)", (target, 2**40))
            conn.execute("INSERT INTO meshes VALUES ('mesh', 0)")
        local = threading.local()
        failing = {"rate": 0.0}
        failures: dict[str, float] = {}

        def db() -> psycopg.Connection[Any]:
            conn = getattr(local, "conn", None)
            if conn is None:
                conn = local.conn = psycopg.connect(url, autocommit=False)
            return conn

        @DBOS.step()
        def reserve(agent: str, target: str) -> None:
            with db().transaction():
                done = (
                    db()
                    .execute(
                        "INSERT INTO reservations VALUES (%s, %s, 100) ON CONFLICT DO NOTHING "
                        "RETURNING 1",
                        (agent, target),
                    )
                    .fetchone()
                )
                if (
                    done
                    and not db()
                    .execute(
                        "UPDATE targets SET cpu_used = cpu_used + 100, workloads = workloads + 1 "
                        "WHERE id = %s AND cpu_used + 100 <= cpu_limit RETURNING 1",
                        (target,),
                    )
                    .fetchone()
                ):
                    raise Refused(f"target {target} is full")

        @DBOS.step()
        def release(agent: str) -> None:
            with db().transaction():
                row = (
                    db()
                    .execute(
                        "DELETE FROM reservations WHERE agent = %s RETURNING target, cpu", (agent,)
                    )
                    .fetchone()
                )
                if row:
                    db().execute(
                        "UPDATE targets SET cpu_used = cpu_used - %s, workloads = workloads - 1 "
                        "WHERE id = %s",
                        (row[1], row[0]),
                    )

        @DBOS.step()
        def initialize(agent: str, target: str) -> None:
            with db().transaction():
                db().execute(
                    "INSERT INTO agents VALUES (%s, %s, NULL, 'ACTIVE') ON CONFLICT DO NOTHING",
                    (agent, target),
                )

        @DBOS.step()
        def cleanup(agent: str) -> None:
            with db().transaction():
                db().execute("UPDATE agents SET state = 'TERMINATED' WHERE id = %s", (agent,))

        @DBOS.step()
        def register(agent: str, fail: bool) -> None:
            if fail:
                failures[agent] = time.time()
                raise Refused("register_with_mesh failed")
            with db().transaction():
                if (
                    db()
                    .execute(
                        "UPDATE agents SET mesh = 'mesh' WHERE id = %s AND mesh IS NULL RETURNING 1",
                        (agent,),
                    )
                    .fetchone()
                ):
                    db().execute("UPDATE meshes SET members = members + 1 WHERE id = 'mesh'")

        @DBOS.workflow()
        def spawn(agent: str, target: str, fail: bool) -> str:
            done: list[Any] = []
            try:
                reserve(agent, target)
                done.append(lambda: release(agent))
                initialize(agent, target)
                done.append(lambda: cleanup(agent))
                register(agent, fail)
                return "COMPLETED"
            except Refused:
                for undo in reversed(done):
                    undo()
                return "COMPENSATED"

        config: DBOSConfig = {
            "name": "tadpole-saga-bench",
            "system_database_url": url,
            "application_version": "bench-1",
            "log_level": "WARNING",
        }
        DBOS(config=config)
        DBOS.launch()
        results = {}
        try:
            for phase, rate in (("clean", 0.0), ("failing_20pct_register", args.fail_rate)):
                target = "clean" if rate == 0 else "failing"
                failing["rate"] = rate
                counter = itertools.count()
                lock = threading.Lock()
                outcomes: list[tuple[str, str, float]] = []

                def worker(
                    counter: Any = counter,
                    lock: Any = lock,
                    target: str = target,
                    outcomes: list[tuple[str, str, float]] = outcomes,
                ) -> None:
                    rng = random.Random()
                    while True:
                        with lock:
                            i = next(counter)
                        if i >= args.sagas:
                            return
                        agent = f"{target}-{i}"
                        state = spawn(agent, target, rng.random() < failing["rate"])
                        outcomes.append((agent, state, time.time()))

                start = time.time()
                threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                end = max(o[2] for o in outcomes)
                states: dict[str, int] = {}
                for _, state, _ in outcomes:
                    states[state] = states.get(state, 0) + 1
                to_compensated = [
                    (ended - failures[agent]) * 1000
                    for agent, state, ended in outcomes
                    if state == "COMPENSATED"
                ]
                with psycopg.connect(url) as conn:
                    (workloads,) = conn.execute(
                        "SELECT workloads FROM targets WHERE id = %s", (target,)
                    ).fetchone() or (0,)
                if workloads != states.get("COMPLETED", 0):
                    raise SystemExit(f"{phase}: {workloads} reservations, {states}")
                results[phase] = {
                    "sagas": args.sagas,
                    "sagas_per_second": args.sagas / (end - start),
                    "states": states,
                    "failure_to_compensated_ms": {
                        "n": len(to_compensated),
                        "p50": percentile(to_compensated, 0.5),
                        "p99": percentile(to_compensated, 0.99),
                    }
                    if to_compensated
                    else None,
                    "target_current_workloads": workloads,
                }
                log(f"dbos {phase}: {results[phase]['sagas_per_second']:.1f} sagas/s {states}")
        finally:
            DBOS.destroy(workflow_completion_timeout_sec=0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sagas", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--fail-rate", type=float, default=0.2)
    parser.add_argument("--database-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
