"""Agents, meshes, targets and sagas (seeds 000 and 001) against the real stack.

One `tadpole up` for the module, with a faults file only tests switch on
(``TADPOLE_TEST_SAGA_FAULTS``): each test writes its rules, matched to its own
target or mesh tag, so the tests do not see each other's faults.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from tests.e2e.conftest import Stack, drop_everything, free_port, http, stack_env, wait_for

pytestmark = pytest.mark.e2e

SPAWN_STEPS = ("reserve_resources", "initialize_agent_state", "register_with_mesh")
MESH_STEPS = ("negotiate_capabilities", "establish_connections", "synchronize_state")
COMPENSATIONS = {
    "reserve_resources": "release_resources",
    "initialize_agent_state": "cleanup_agent_state",
    "register_with_mesh": "deregister_from_mesh",
    "negotiate_capabilities": "reset_capabilities",
    "establish_connections": "terminate_connections",
    "synchronize_state": "rollback_state",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("sagas")
    name = f"e2e{uuid4().hex[:8]}"
    port = free_port()
    faults = tmp / "faults.json"
    faults.write_text('{"rules": []}')
    env = {**stack_env(port, name), "TADPOLE_TEST_SAGA_FAULTS": str(faults)}
    s = Stack(port=port, env=env, log=tmp / f"{name}.log")
    s.extra.update(name=name, faults=faults, rules=[], lock=threading.Lock())
    s.start()
    try:
        yield s
    finally:
        s.stop()
        drop_everything(name)


def add_faults(stack: Stack, *rules: dict[str, Any]) -> None:
    """Add fault rules (the runner re-reads the file as it changes)."""
    with stack.extra["lock"]:
        stack.extra["rules"].extend(rules)
        path: Path = stack.extra["faults"]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"rules": stack.extra["rules"]}))
        os.replace(tmp, path)


def remove_faults(stack: Stack, target: str) -> None:
    with stack.extra["lock"]:
        rules = stack.extra["rules"]
        rules[:] = [r for r in rules if r.get("match", {}).get("targetId") != target]
    add_faults(stack)


def put_target(stack: Stack, cpu: int = 4000, memory: int = 8 << 30, workloads: int = 10) -> str:
    target = f"node-{uuid4().hex[:10]}"
    status, body = http(
        "PUT",
        f"{stack.base}/api/v1/targets/{target}",
        {
            "state": "READY",
            "capabilities": {"gpu": "a100"},
            "resources": {
                "cpu_millicores": cpu,
                "memory_bytes": memory,
                "max_workloads": workloads,
            },
        },
    )
    assert status == 201, body
    return target


def saga_of(stack: Stack, saga: str) -> dict[str, Any]:
    status, body = http("GET", f"{stack.base}/api/v1/sagas/{saga}")
    assert status == 200, body
    found: dict[str, Any] = body
    return found


def ended(stack: Stack, saga: str, timeout: float = 40) -> dict[str, Any]:
    """The saga once it is COMPLETED, COMPENSATED or ABORTED."""
    found: dict[str, Any] = wait_for(
        lambda: (
            (s := saga_of(stack, saga))["state"] in ("COMPLETED", "COMPENSATED", "ABORTED") and s
        ),
        timeout,
        f"saga {saga} to end",
    )
    return found


def form_mesh(stack: Stack, tag: str, **fields: Any) -> tuple[str, str]:
    body = {
        "topology": "full",
        "requiredCapabilities": {"gpu": "a100", "test": tag},
        "minMembers": 1,
        "maxMembers": 3,
        **fields,
    }
    status, answer = http("POST", f"{stack.base}/api/v1/meshes", body)
    assert status == 202, answer
    return answer["sagaId"], answer["meshId"]


def spawn(
    stack: Stack, target: str, mesh: str | None, tag: str, cpu: int = 500, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "targetId": target,
        "capabilities": {"gpu": "a100", "test": tag},
        "resources": {"cpu_millicores": cpu, "memory_bytes": 1 << 20},
        **extra,
    }
    if mesh is not None:
        body["meshId"] = mesh
    status, answer = http("POST", f"{stack.base}/api/v1/agents/spawn", body)
    assert status == 202, answer
    assert answer["sagaId"].startswith("saga-") and answer["agentId"].startswith("agent-")
    found: dict[str, Any] = answer
    return found


def target_status(stack: Stack, target: str) -> dict[str, Any]:
    status, body = http("GET", f"{stack.base}/v1/targets/{target}/status")
    assert status == 200, body
    found: dict[str, Any] = body
    return found


def workloads_become(stack: Stack, target: str, n: int) -> None:
    wait_for(
        lambda: target_status(stack, target)["current_workloads"] == n,
        10,
        f"{target} to hold {n} agents",
    )


def formed_mesh(stack: Stack, tag: str) -> str:
    saga, mesh = form_mesh(stack, tag)
    assert ended(stack, saga)["state"] == "COMPLETED"
    return mesh


def test_an_agent_is_spawned_into_a_mesh_and_its_saga_shows_each_step(stack: Stack) -> None:
    tag = uuid4().hex[:8]
    mesh = formed_mesh(stack, tag)
    target = put_target(stack)
    answer = spawn(stack, target, mesh, tag)
    saga = ended(stack, answer["sagaId"])
    assert saga["state"] == "COMPLETED"
    assert [s["name"] for s in saga["steps"]] == list(SPAWN_STEPS)
    for step in saga["steps"]:
        assert step["state"] == "SUCCEEDED"
        assert step["startedAt"] <= step["endedAt"]
        assert step["outcome"] is not None
    workloads_become(stack, target, 1)
    status = target_status(stack, target)
    assert status["state"] == "READY" and status["resource_usage"]["cpu_usage"] == 500 / 4000
    agent = wait_for(
        lambda: (
            (r := http("GET", f"{stack.base}/api/v1/agents/{answer['agentId']}"))[0] == 200 and r[1]
        ),
        10,
        "the agent",
    )
    assert agent["state"] == "ACTIVE" and agent["meshId"] == mesh and agent["targetId"] == target
    members = wait_for(
        lambda: http("GET", f"{stack.base}/api/v1/meshes/{mesh}")[1].get("members"), 10, "members"
    )
    assert members == [answer["agentId"]]
    # The sagas list shows it among the completed ones.
    wait_for(
        lambda: (
            answer["sagaId"]
            in {
                s["sagaId"]
                for s in http("GET", f"{stack.base}/api/v1/sagas?state=COMPLETED&limit=1000")[1][
                    "sagas"
                ]
            }
        ),
        10,
        "the read model to list the saga COMPLETED",
    )


@pytest.mark.parametrize("failing", SPAWN_STEPS)
@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_each_spawn_step_failing_or_timing_out_ends_compensated(
    stack: Stack, failing: str, fault: str
) -> None:
    tag = uuid4().hex[:8]
    mesh = formed_mesh(stack, tag)
    target = put_target(stack)
    add_faults(stack, {"step": failing, "action": fault, "match": {"targetId": target}})
    answer = spawn(stack, target, mesh, tag)
    saga = ended(stack, answer["sagaId"])
    assert saga["state"] == "COMPENSATED", saga
    steps = {s["name"]: s for s in saga["steps"]}
    assert steps[failing]["state"] == ("FAILED" if fault == "fail" else "COMPENSATED")
    if fault == "hang":  # a step that timed out is compensated too: its effect may have happened
        assert "timed out" in saga["reason"]
    done = SPAWN_STEPS[: SPAWN_STEPS.index(failing)]
    assert [s for s in steps if s != failing] == list(done)
    for name in done:
        assert steps[name]["state"] == "COMPENSATED" and steps[name]["compensatedAt"]
    # Nothing of it is left: no reservation, no member, the agent (if made) terminated.
    workloads_become(stack, target, 0)
    members = wait_for(
        lambda: (r := http("GET", f"{stack.base}/api/v1/meshes/{mesh}"))[0] == 200 and r[1],
        10,
        "the mesh",
    )["members"]
    assert answer["agentId"] not in members
    code, agent = http("GET", f"{stack.base}/api/v1/agents/{answer['agentId']}")
    assert code == 404 or agent["state"] == "TERMINATED", agent


def test_a_spawn_the_target_or_mesh_cannot_take_fails_at_that_step(stack: Stack) -> None:
    tag = uuid4().hex[:8]
    mesh = formed_mesh(stack, tag)
    target = put_target(stack, cpu=1000)
    too_big = ended(stack, spawn(stack, target, mesh, tag, cpu=1500)["sagaId"])
    assert too_big["state"] == "COMPENSATED"
    assert too_big["steps"][0]["name"] == "reserve_resources"
    assert "cpu_millicores" in too_big["steps"][0]["outcome"]
    wrong = spawn(stack, target, mesh, "another-tag")
    saga = ended(stack, wrong["sagaId"])
    assert saga["state"] == "COMPENSATED"
    assert saga["steps"][-1]["name"] == "register_with_mesh"
    assert "required capabilities" in saga["steps"][-1]["outcome"]
    workloads_become(stack, target, 0)


def test_concurrent_reservations_never_exceed_a_targets_limits(stack: Stack) -> None:
    tag = uuid4().hex[:8]
    target = put_target(stack, cpu=1000, workloads=5)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one() -> None:
        found = spawn(stack, target, None, tag, cpu=300)
        with lock:
            answers.append(found)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sagas = [ended(stack, a["sagaId"]) for a in answers]
    completed = [s for s in sagas if s["state"] == "COMPLETED"]
    assert len(completed) == 3  # 3 × 300 of 1000 millicores
    assert all(s["state"] == "COMPENSATED" for s in sagas if s not in completed)
    workloads_become(stack, target, 3)
    assert target_status(stack, target)["resource_usage"]["cpu_usage"] == 900 / 1000


@pytest.mark.parametrize("failing", MESH_STEPS)
@pytest.mark.parametrize("fault", ["fail", "hang"])
def test_each_mesh_formation_step_failing_or_timing_out_ends_compensated(
    stack: Stack, failing: str, fault: str
) -> None:
    tag = uuid4().hex[:8]
    add_faults(
        stack,
        {"step": failing, "action": fault, "match": {"requiredCapabilities.test": tag}},
    )
    saga_id, mesh = form_mesh(stack, tag)
    saga = ended(stack, saga_id, timeout=60)
    assert saga["state"] == "COMPENSATED", saga
    names = [s["name"] for s in saga["steps"]]
    assert names == list(MESH_STEPS[: MESH_STEPS.index(failing) + 1])
    for step in saga["steps"][:-1]:
        assert step["state"] == "COMPENSATED"
    # No mesh came of it: the read model shows it FAILED once it has the saga's end.
    wait_for(
        lambda: (
            http("GET", f"{stack.base}/api/v1/meshes/{mesh}")[1].get("state")
            in ("FAILED", "DISSOLVED")
        ),
        10,
        "the mesh to show FAILED",
    )


def test_a_saga_runner_killed_mid_step_restarts_and_compensates(stack: Stack) -> None:
    tag = uuid4().hex[:8]
    target = put_target(stack)
    add_faults(
        stack, {"step": "initialize_agent_state", "action": "hang", "match": {"targetId": target}}
    )
    answer = spawn(stack, target, None, tag)
    wait_for(
        lambda: any(
            s["name"] == "initialize_agent_state" and s["state"] == "RUNNING"
            for s in saga_of(stack, answer["sagaId"])["steps"]
        ),
        20,
        "the step to run",
    )
    runner = stack.children()["sagas"]
    os.kill(runner, signal.SIGKILL)
    wait_for(lambda: stack.children().get("sagas") not in (None, runner), 20, "a new runner")
    saga = ended(stack, answer["sagaId"])
    assert saga["state"] == "COMPENSATED"
    assert {s["name"]: s["state"] for s in saga["steps"]} == {
        "reserve_resources": "COMPENSATED",
        "initialize_agent_state": "COMPENSATED",
    }
    workloads_become(stack, target, 0)


def test_a_saga_runner_killed_mid_compensation_finishes_it_after_restart(stack: Stack) -> None:
    tag = uuid4().hex[:8]
    target = put_target(stack)
    add_faults(
        stack,
        {"step": "initialize_agent_state", "action": "fail", "match": {"targetId": target}},
        {"step": "release_resources", "action": "crash", "match": {"targetId": target}, "rate": 1},
    )
    runner = wait_for(lambda: stack.children().get("sagas"), 10, "the runner")
    answer = spawn(stack, target, None, tag)
    # The runner ends itself (as kill -9 would) when it reaches release_resources, holding
    # its lease; the fault is lifted while it restarts, and once the lease lapses the
    # compensation is taken again.
    wait_for(lambda: stack.children().get("sagas") not in (None, runner), 30, "a new runner")
    remove_faults(stack, target)
    saga = ended(stack, answer["sagaId"])
    assert saga["state"] == "COMPENSATED"
    assert saga["steps"][0]["state"] == "COMPENSATED"
    workloads_become(stack, target, 0)


def test_constraint_violations_and_bad_input_are_refused(stack: Stack) -> None:
    tag = uuid4().hex[:8]
    mesh = formed_mesh(stack, tag)
    target = put_target(stack)
    agent = spawn(stack, target, mesh, tag)
    assert ended(stack, agent["sagaId"])["state"] == "COMPLETED"
    # min_members is 1: the only member may not leave an ACTIVE mesh.
    code, body = http("DELETE", f"{stack.base}/api/v1/meshes/{mesh}/members/{agent['agentId']}")
    assert code == 409 and "min_members" in body["error"], body
    # Its mesh requires test=<tag>: the agent may not lose it.
    code, body = http(
        "PUT",
        f"{stack.base}/api/v1/agents/{agent['agentId']}/capabilities",
        {"capabilities": {"gpu": "a100"}},
    )
    assert code == 409 and "requires" in body["error"], body
    bad = [
        ("PUT", f"/api/v1/targets/{target}", {"state": "SLEEPY", "resources": {}}),
        ("PUT", "/api/v1/targets/bad%20id", {"state": "READY"}),
        (
            "PUT",
            f"/api/v1/targets/{target}",
            {
                "state": "READY",
                "resources": {"cpu_millicores": -1, "memory_bytes": 1, "max_workloads": 1},
            },
        ),
        ("POST", "/api/v1/meshes", {"topology": "blob"}),
        ("POST", "/api/v1/meshes", {"topology": "full", "minMembers": 5, "maxMembers": 2}),
        ("POST", "/api/v1/agents/spawn", {"targetId": target, "resources": {"cpu_millicores": 1}}),
        (
            "POST",
            "/api/v1/agents/spawn",
            {
                "targetId": target,
                "meshId": "nope",
                "resources": {"cpu_millicores": 1, "memory_bytes": 1},
            },
        ),
        ("PUT", "/api/v1/contexts/c1", {"hierarchies": "a/b"}),
        ("GET", "/api/v1/sagas?state=HAPPY", None),
    ]
    for method, path, body in bad:
        code, answer = http(method, stack.base + path, body)
        assert code == 400 and answer["success"] is False and answer["error"], (path, answer)
    code, _ = http("GET", f"{stack.base}/api/v1/sagas/saga-{'0' * 32}")
    assert code == 404


def test_contexts_are_modified_and_read(stack: Stack) -> None:
    context = f"ctx-{uuid4().hex[:8]}"
    body = {"hierarchies": ["org", "org/team"], "properties": {"region": "eu"}}
    code, answer = http("PUT", f"{stack.base}/api/v1/contexts/{context}", body)
    assert code == 201, answer
    code, answer = http("PUT", f"{stack.base}/api/v1/contexts/{context}", body)
    assert code == 200 and answer["changed"] is False
    code, found = http("GET", f"{stack.base}/api/v1/contexts/{context}")
    assert code == 200, found
    assert found["hierarchies"] == ["org", "org/team"] and found["properties"] == {"region": "eu"}


def test_seed_000s_scheduler_endpoints_answer_in_its_shapes(stack: Stack) -> None:
    code, health = http("GET", f"{stack.base}/v1/scheduler/health")
    assert code == 200 and set(health) == {"status", "queue_depth", "active_workers", "error_rate"}
    assert health["status"] in ("HEALTHY", "DEGRADED", "UNHEALTHY")
    code, metrics = http("GET", f"{stack.base}/v1/scheduler/metrics")
    assert code == 200
    assert set(metrics) == {
        "jobs_per_second",
        "avg_latency_ms",
        "queue_depth",
        "error_count",
        "active_targets",
    }
    assert metrics["active_targets"] >= 0


def test_two_runners_racing_for_every_step_drive_each_saga_once(stack: Stack) -> None:
    """A second runner in a consumer group of its own gets every cue the first gets: they
    race for every step, and the leases let exactly one drive each."""
    import subprocess
    import sys

    from tests.e2e.conftest import ROOT

    second = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "sagas", "--driver", "second", "--group", "rival"],
        env={**stack.env, "KAFKA_BOOTSTRAP_SERVERS": _broker(stack)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        tag = uuid4().hex[:8]
        target = put_target(stack, cpu=100_000, workloads=1000)
        sagas: list[dict[str, Any]] = []

        def both_drive() -> bool:  # the second runner joins its group in a few seconds
            batch = [spawn(stack, target, None, tag) for _ in range(10)]
            sagas.extend(ended(stack, a["sagaId"]) for a in batch)
            drivers = {step["driver"] for s in sagas[-10:] for step in s["steps"]}
            return len(drivers) == 2

        wait_for(both_drive, 60, "both runners to drive steps", interval=0.5)
        assert all(s["state"] == "COMPLETED" for s in sagas)
        for s in sagas:
            assert [step["state"] for step in s["steps"]] == ["SUCCEEDED"] * 3
        workloads_become(stack, target, len(sagas))  # no step took effect twice
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(15)


def _broker(stack: Stack) -> str:
    """The embedded broker's address, as `tadpole up` gave it to its children."""
    pid = stack.children()["sagas"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    for entry in environ:
        if entry.startswith(b"KAFKA_BOOTSTRAP_SERVERS="):
            return entry.split(b"=", 1)[1].decode()
    raise AssertionError("the runner was given no broker")
