"""Agent-spawning sagas end to end over Tadpole's HTTP API (issue 13, item 10).

1. `tadpole up` on a free port with fresh names (bench/run.py's ``deployment``),
   with a faults file (``TADPOLE_TEST_SAGA_FAULTS``: test and benchmark only).
2. One target with room for every agent, and one mesh (formed by its saga) that
   every agent joins.
3. **Clean phase**: ``--sagas`` spawns (default 1,000) sent by ``--clients``
   concurrent connections (default 16), back to back; each saga runs its three
   steps through the saga runner (``tadpole sagas``, one process). sagas/s =
   sagas / (first spawn sent → last saga ended, by its ``endedAt``). Every saga
   must end COMPLETED.
4. **Failing phase**: the same against a second target, with 20% of
   ``register_with_mesh`` steps failing (a fault rule, rate 0.2): those sagas
   compensate their two earlier steps in reverse and end COMPENSATED. Reported:
   sagas/s, how many compensated, and the time from the failed step's end (its
   ``endedAt``) to its saga's COMPENSATED (the saga's ``endedAt``), p50/p99.
   Afterwards the target must hold exactly the agents of the COMPLETED sagas.

Each saga's outcome is read back with ``GET /api/v1/sagas/{id}`` (the event
store's truth), polled after all spawns were sent; times are the writer's own
timestamps, so the polling does not enter the figures.

Beside it, in the same run: DBOS Transact running the same saga as a user would write
it there (bench/sagas_dbos.py, in bench/.venv-peers), the same number of sagas per
phase at the same concurrency, on the same PostgreSQL; the ratios are Tadpole's
sagas/s over DBOS's.

Run with `make bench-sagas`; results go to bench/results/sagas-<date>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, cleanup, deployment, log, percentile, wait_healthy


def ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


async def put_target(http: httpx.AsyncClient, name: str) -> None:
    r = await http.put(
        f"/api/v1/targets/{name}",
        json={
            "state": "READY",
            "capabilities": {"kind": "bench"},
            "resources": {
                "cpu_millicores": 2**32 - 1,
                "memory_bytes": 2**62,
                "max_workloads": 2**31 - 1,
            },
        },
    )
    r.raise_for_status()


async def saga_view(http: httpx.AsyncClient, saga: str) -> dict[str, Any]:
    for attempt in range(3):  # a GET may be sent again: a reused connection can be reset
        try:
            r = await http.get(f"/api/v1/sagas/{saga}")
            break
        except httpx.TransportError:
            if attempt == 2:
                raise
            await asyncio.sleep(0.1)
    r.raise_for_status()
    found: dict[str, Any] = r.json()
    return found


async def until_ended(
    http: httpx.AsyncClient, sagas: list[str], timeout: float
) -> list[dict[str, Any]]:
    """Every saga once final, polled with bounded concurrency."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    pending = list(sagas)
    while pending:
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(pending)} sagas did not end within {timeout}s")
        views = await asyncio.gather(*(saga_view(http, s) for s in pending[:64]))
        for view in views:
            if view["state"] in ("COMPLETED", "COMPENSATED", "ABORTED"):
                done[view["sagaId"]] = view
        pending = [s for s in pending if s not in done]
        if pending:
            await asyncio.sleep(0.2)
    return [done[s] for s in sagas]


async def phase(base: str, target: str, mesh: str, n: int, clients: int) -> dict[str, Any]:
    # Kept-alive connections are dropped before the server drops them (5 s): one reused
    # as the server closed it fails the request.
    limits = httpx.Limits(max_connections=clients + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        sagas: list[str] = []
        latencies: list[float] = []

        async def client() -> None:
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                sent = time.perf_counter()
                r = await http.post(
                    "/api/v1/agents/spawn",
                    json={
                        "targetId": target,
                        "meshId": mesh,
                        "capabilities": {"kind": "bench"},
                        "resources": {"cpu_millicores": 100, "memory_bytes": 1 << 20},
                    },
                )
                latencies.append((time.perf_counter() - sent) * 1000)
                if r.status_code != 202:
                    raise SystemExit(f"spawn answered {r.status_code}: {r.text}")
                sagas.append(r.json()["sagaId"])

        first = time.time()
        await asyncio.gather(*(client() for _ in range(clients)))
        sent_all = time.time()
        views = await until_ended(http, sagas, timeout=600)
        last = max(ts(v["endedAt"]) for v in views)
        states: dict[str, int] = {}
        for v in views:
            states[v["state"]] = states.get(v["state"], 0) + 1
        to_compensated = [
            (ts(v["endedAt"]) - ts(failed["endedAt"])) * 1000
            for v in views
            if v["state"] == "COMPENSATED"
            for failed in v["steps"]
            if failed["state"] == "FAILED"
        ]
        status = (await http.get(f"/v1/targets/{target}/status")).json()
        odd = [v for v in views if v["state"] != "COMPLETED"]
    return {
        "sagas": n,
        "sagas_per_second": n / (last - first),
        "spawns_sent_per_second": n / (sent_all - first),
        "states": states,
        "spawn_http_ms": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99)},
        "failure_to_compensated_ms": (
            {
                "n": len(to_compensated),
                "p50": percentile(to_compensated, 0.5),
                "p99": percentile(to_compensated, 0.99),
            }
            if to_compensated
            else None
        ),
        "target_current_workloads": status["current_workloads"],
        "example": {"reason": odd[0]["reason"], "steps": odd[0]["steps"]} if odd else None,
    }


async def bench(base: str, faults: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=base, timeout=30, limits=httpx.Limits(keepalive_expiry=2.0)
    ) as http:
        r = await http.post(
            "/api/v1/meshes",
            json={
                "topology": "star",
                "requiredCapabilities": {"kind": "bench"},
                "minMembers": 0,
                "maxMembers": 10_000,
            },
        )
        r.raise_for_status()
        mesh_saga, mesh = r.json()["sagaId"], r.json()["meshId"]
        (view,) = await until_ended(http, [mesh_saga], timeout=60)
        if view["state"] != "COMPLETED":
            raise SystemExit(f"the mesh was not formed: {view}")
        for name in ("bench-clean", "bench-failing"):
            await put_target(http, name)
    log(f"clean phase: {args.sagas} spawns, {args.clients} clients")
    clean = await phase(base, "bench-clean", mesh, args.sagas, args.clients)
    faults.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "step": "register_with_mesh",
                        "action": "fail",
                        "rate": 0.2,
                        "match": {"targetId": "bench-failing"},
                    }
                ]
            }
        )
    )
    log("failing phase: 20% of register_with_mesh steps fail")
    failing = await phase(base, "bench-failing", mesh, args.sagas, args.clients)
    for name, result in (("clean", clean), ("failing", failing)):
        completed = result["states"].get("COMPLETED", 0)
        if result["target_current_workloads"] != completed:
            raise SystemExit(
                f"{name}: the target holds {result['target_current_workloads']} agents, {completed} sagas completed"
            )
    if clean["states"] != {"COMPLETED": args.sagas}:
        raise SystemExit(f"clean phase: {clean['states']}; e.g. {clean['example']}")
    return {"clean": clean, "failing_20pct_register": failing}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sagas", type=int, default=1000, help="spawns per phase")
    parser.add_argument("--clients", type=int, default=16, help="concurrent spawning connections")
    parser.add_argument("--out", type=Path, default=None, help="results file")
    args = parser.parse_args()
    name, port, env = deployment("bsaga")
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        faults = Path(tmp) / "faults.json"
        faults.write_text('{"rules": []}')
        env["TADPOLE_TEST_SAGA_FAULTS"] = str(faults)
        log(f"starting tadpole up on {base} ({name}); its log: {Path(tmp) / 'stack.log'}")
        stack_log = (Path(tmp) / "stack.log").open("wb")
        stack = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up"],
            env=env,
            cwd=ROOT,
            stdout=stack_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_healthy(base)
            time.sleep(5)  # the consumer groups (projectors, saga runner) join
            results = asyncio.run(bench(base, faults, args))
        finally:
            stack.send_signal(2)
            try:
                stack.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, 9)
            cleanup(name)
            stack_log.close()
            for line in (Path(tmp) / "stack.log").read_text(errors="replace").splitlines():
                if "exited with" in line or "Traceback" in line or "CRITICAL" in line:
                    log(f"stack: {line}")
    log("DBOS: the same saga, the same phases")
    peers = ROOT / "bench" / ".venv-peers" / "bin" / "python"
    dbos = json.loads(
        subprocess.run(
            [
                str(peers),
                "sagas_dbos.py",
                "--sagas",
                str(args.sagas),
                "--concurrency",
                str(args.clients),
            ],
            cwd=ROOT / "bench",
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    ratios = {
        phase: results[phase]["sagas_per_second"] / dbos[phase]["sagas_per_second"]
        for phase in ("clean", "failing_20pct_register")
    }
    results = {**results, "dbos": dbos, "ratio_tadpole_over_dbos": ratios}
    report = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "when": datetime.now(UTC).isoformat(),
        "args": vars(args) | {"out": str(args.out)},
        **results,
    }
    out = args.out or ROOT / "bench" / "results" / f"sagas-{datetime.now(UTC):%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()) if out.exists() else []
    runs.append(report)
    out.write_text(json.dumps(runs, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
