"""The reference worker, `tadpole worker`, against `tadpole up`: processes as a user starts them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import ROOT, Stack, http, wait_for

STEP = "tests.e2e.worker_tasks:step"
HOLD = "tests.e2e.worker_tasks:hold"
#: A workflow command: multiplies the total its dependency passed on by ten.
TIMES_TEN = [
    sys.executable,
    "-c",
    "import json, os, sys; given = json.load(sys.stdin); print('a log line');"
    "print(json.dumps({'total': given['tasks']['one']['total'] * 10,"
    " 'attempt': os.environ['TADPOLE_ATTEMPT']}))",
]
#: A job command standing in for seed 003's java line: a JSON result for PSO, text for GA.
JOB_SCRIPT = (
    "import json, sys; alg, iterations, agents = sys.argv[1], int(sys.argv[2]), sys.argv[3];"
    "print('warming up');"
    "print(json.dumps({'fopt': iterations / 1000, 'iter': iterations, 'runtimeMs': 7, 'alg': alg})"
    " if alg == 'PSO' else '%s best at %d' % (alg, iterations))"
)


@dataclass
class WorkerProcess:
    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def spot(self) -> str:
        found = re.findall(r"registered as (spot-\w+)", self.text())
        assert found, self.text()
        return str(found[-1])

    def registered(self, times: int = 1) -> bool:
        return len(re.findall(r"registered as spot-", self.text())) >= times


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    started: list[WorkerProcess] = []

    def start(
        stack: Stack, *args: str, env: dict[str, str] | None = None, wait: bool = True
    ) -> WorkerProcess:
        log = tmp_path / f"worker-{len(started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--url", stack.base, *args],
            cwd=ROOT,
            env={**stack.env, **(env or {})},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        worker = WorkerProcess(process, log)
        started.append(worker)
        if wait:
            wait_for(worker.registered, 30, f"the worker to register (log: {log})")
        return worker

    yield start
    for worker in started:
        if worker.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            worker.process.wait()


def register(stack: Stack, name: str, tasks: list[dict[str, Any]]) -> None:
    body = {"namespace": "workers", "name": name, "version": "1", "tasks": tasks}
    status, answer = http("POST", stack.base + "/api/v1/workflows", body)
    assert status == 201, answer


def start_run(stack: Stack, name: str, run_id: str, given: dict[str, Any]) -> str:
    status, body = http(
        "POST",
        f"{stack.base}/api/v1/workflows/workers/{name}/runs",
        {"runId": run_id, "input": given},
    )
    assert status == 201, body
    instance: str = body["instanceId"]
    return instance


def run_of(stack: Stack, instance: str) -> dict[str, Any]:
    status, body = http("GET", f"{stack.base}/api/v1/workflow-runs/{instance}")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def state_is(stack: Stack, instance: str, *states: str) -> bool:
    return run_of(stack, instance)["state"] in states


def history(stack: Stack, instance: str) -> list[dict[str, Any]]:
    status, body = http("GET", f"{stack.base}/api/v1/audit/workflow-run/{instance}/events")
    assert status == 200, body
    events: list[dict[str, Any]] = body["events"]
    return events


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_two_workers_run_workflows_of_callables_and_commands_and_a_job(
    make_stack: Any, start_worker: Any
) -> None:
    stack: Stack = make_stack()
    stack.env["TADPOLE_AGENT_KEY"] = "worker-secret"
    stack.start()
    register(
        stack,
        "chain",
        [
            {"id": "one", "dependsOn": [], "payload": {"callable": STEP, "add": 1}},
            {"id": "two", "dependsOn": ["one"], "payload": {"command": TIMES_TEN}},
            {"id": "three", "dependsOn": ["two"], "payload": {"callable": STEP, "add": 5}},
        ],
    )
    job_command = f"{sys.executable} -c {json.dumps(JOB_SCRIPT)} {{alg}} {{iterations}} {{agents}}"
    # One worker is given the key on its command line, the other has it in its environment.
    workers = [
        start_worker(
            stack,
            "--concurrency",
            "2",
            "--job-command",
            job_command,
            *(["--key", "worker-secret"] if n == 0 else []),
            env={"TADPOLE_AGENT_KEY": ""} if n == 0 else None,
        )
        for n in range(2)
    ]
    status, _ = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.9.9.9"})
    assert status == 401  # the key is needed indeed
    instances = {n: start_run(stack, "chain", f"run-{n}", {"start": n}) for n in range(8)}
    for instance in instances.values():
        wait_for(lambda i=instance: state_is(stack, i, "COMPLETED", "FAILED"), 60, "the runs")
    for n, instance in instances.items():
        run = run_of(stack, instance)
        assert run["state"] == "COMPLETED", run
        one, two, three = run["tasks"]
        assert [t["attempts"] for t in run["tasks"]] == [1, 1, 1]
        assert one["output"]["total"] == n + 1
        assert two["output"] == {"total": (n + 1) * 10, "attempt": "1"}
        assert three["output"]["total"] == (n + 1) * 10 + 5
        assert three["output"]["step"] == "three"
    holders = {
        e["data"]["holder"]
        for i in instances.values()
        for e in history(stack, i)
        if e["type"] == "WorkflowRun.TaskClaimed"
    }
    assert holders <= {w.spot for w in workers}

    # A job's tasks run through --job-command.
    status, job = http(
        "POST",
        stack.base + "/api/v1/jobs",
        {
            "jarPath": "/opt/opt.jar",
            "mainClass": "com.example.OptRunner",
            "algorithms": ["PSO", "GA"],
            "iterations": {"min": 100, "max": 200, "step": 100},
            "agents": {"min": 10, "max": 10, "step": 1},
            "dimension": {"min": 2, "max": 2, "step": 1},
        },
    )
    assert status == 201, job
    job_url = f"{stack.base}/api/v1/jobs/{job['jobId']}"
    wait_for(lambda: http("GET", job_url)[1]["status"] != "RUNNING", 60, "the job to end")
    assert http("GET", job_url)[1]["status"] == "DONE"
    _, results = http("GET", job_url + "/results")
    assert results["totalCompleted"] == 4
    for result in results["results"]:
        completed = [
            e["data"]
            for e in http("GET", f"{stack.base}/api/v1/audit/task/{result['taskId']}/events")[1][
                "events"
            ]
            if e["type"] == "TaskBlock.Completed"
        ]
        assert len(completed) == 1
        (done,) = completed
        if result["algorithm"] == "PSO":
            it = result["iterations"]
            assert (result["fopt"], result["runtimeMs"], done["iter"]) == (it / 1000, 7, it)
            assert json.loads(done["resultJson"]) == {
                "fopt": it / 1000,
                "iter": it,
                "runtimeMs": 7,
                "alg": "PSO",
            }
        else:
            assert (result["fopt"], done["iter"]) == (None, None)
            assert result["runtimeMs"] > 0  # measured by the worker
            assert json.loads(done["resultJson"]) == {
                "stdout": f"warming up\nGA best at {result['iterations']}"
            }
    for worker in workers:
        worker.process.send_signal(signal.SIGTERM)
    for worker in workers:
        assert worker.process.wait(30) == 0, worker.text()


def test_sigterm_lets_a_running_task_finish_then_gives_back_what_outlives_the_grace(
    make_stack: Any, start_worker: Any, tmp_path: Path
) -> None:
    stack: Stack = make_stack()
    stack.start()
    held = {"callable": HOLD, "dir": str(tmp_path)}
    register(stack, "held", [{"id": "hold", "dependsOn": [], "payload": held}])

    # A stopped worker finishes the task it holds within the grace, and claims no other.
    first = start_worker(stack, "--grace", "60")
    finishing = start_run(stack, "held", "finishing", {})
    wait_for(lambda: (tmp_path / f"{finishing}.1.started").exists(), 30, "the task to start")
    first.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping: no more claims" in first.text(), 10, "the worker to stop")
    waiting = start_run(stack, "held", "waiting", {})  # claimable while the first one drains
    (tmp_path / "release").write_text("")
    assert first.process.wait(30) == 0, first.text()
    assert state_is(stack, finishing, "COMPLETED")
    assert [(t["state"], t["attempts"]) for t in run_of(stack, waiting)["tasks"]] == [("READY", 0)]

    # A task that outlives the grace is given back, and another worker completes it.
    (tmp_path / "release").unlink()
    stuck = start_worker(stack, "--grace", "1", env={"WORKER_TASKS_HOLD_FOREVER": "1"})
    wait_for(lambda: (tmp_path / f"{waiting}.1.started").exists(), 30, "the task to start")
    assert run_of(stack, waiting)["tasks"][0]["leaseHolder"] == stuck.spot
    signalled = time.monotonic()
    stuck.process.send_signal(signal.SIGTERM)
    assert stuck.process.wait(30) == 0, stuck.text()
    assert time.monotonic() - signalled < 10  # the grace (1 s), a cancel and one report
    task = run_of(stack, waiting)["tasks"][0]
    assert (task["leaseHolder"], task["attempts"]) == (None, 1), task
    (tmp_path / "release").write_text("")
    other = start_worker(stack)
    wait_for(lambda: state_is(stack, waiting, "COMPLETED"), 60, "another worker to finish it")
    run = run_of(stack, waiting)
    assert run["tasks"][0]["attempts"] == 2
    assert run["tasks"][0]["output"]["attempt"] == 2
    events = history(stack, waiting)
    claims = [e["data"]["holder"] for e in events if e["type"] == "WorkflowRun.TaskClaimed"]
    assert claims == [stuck.spot, other.spot]
    (failed,) = [e["data"] for e in events if e["type"] == "WorkflowRun.AttemptFailed"]
    assert "given back" in failed["error"], failed


def test_renewals_keep_a_long_task_and_a_lost_lease_stops_the_work(
    make_stack: Any, start_worker: Any, tmp_path: Path
) -> None:
    stack: Stack = make_stack()
    stack.env["TADPOLE_LEASE_SECONDS"] = "2"  # the worker renews every third of it
    stack.start()
    pidfile = tmp_path / "pid"
    sleeper = (
        "import json, os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid()));"
        "time.sleep(float(sys.argv[2])); print(json.dumps({'slept': float(sys.argv[2])}))"
    )
    register(
        stack,
        "sleepy",
        [
            {
                "id": "sleep",
                "dependsOn": [],
                "payload": {
                    "command": [sys.executable, "-c", sleeper, str(pidfile), "${input.seconds}"]
                },
            }
        ],
    )
    # The worker's own setting says 30 s (renew every 10 s); the API's lease is 2 s.
    worker = start_worker(stack, env={"TADPOLE_LEASE_SECONDS": "30"})
    # Four seconds is two of the API's leases: only renewals keep it, as often as it needs.
    long = start_run(stack, "sleepy", "long", {"seconds": 4})
    wait_for(lambda: state_is(stack, long, "COMPLETED", "FAILED"), 60, "the long task")
    run = run_of(stack, long)
    assert (run["state"], run["tasks"][0]["attempts"]) == ("COMPLETED", 1), run
    assert run["tasks"][0]["output"] == {"slept": 4.0}

    # The run is cancelled while its task runs: the next renewal is refused, the command stopped.
    pidfile.unlink()
    forever = start_run(stack, "sleepy", "forever", {"seconds": 600})
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 30, "the command"))
    assert http("POST", f"{stack.base}/api/v1/workflow-runs/{forever}/cancel", {})[0] == 200
    wait_for(lambda: not alive(pid), 15, "the worker to stop the command")
    wait_for(lambda: "lease is lost" in worker.text(), 10, "the worker to say why")
    assert state_is(stack, forever, "CANCELLED")

    # The worker goes on: the API forgets it (a fresh store on the same port); it
    # waits out the outage, registers again when a heartbeat is answered 404, works on.
    stack.stop()
    fresh: Stack = make_stack(port=stack.port)
    fresh.env["TADPOLE_LEASE_SECONDS"] = "2"
    fresh.start()
    wait_for(lambda: worker.registered(times=2), 30, "the worker to register again")
    register(
        fresh, "chain", [{"id": "one", "dependsOn": [], "payload": {"callable": STEP, "add": 1}}]
    )
    again = start_run(fresh, "chain", "again", {"start": 1})
    wait_for(lambda: state_is(fresh, again, "COMPLETED"), 30, "the run on the new store")
    assert run_of(fresh, again)["tasks"][0]["output"]["total"] == 2
    assert worker.process.poll() is None
