"""`tadpole up` driven over HTTP like a user and a fleet of workers would."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from eventstore.store import TadpoleStore
from projections.postgres.tables import PostgresReadModel
from projections.redis.dashboards import RedisReadModel
from service.settings import load_settings
from service.wiring import store_env
from streaming.consumer import Projector, StoreReader
from streaming.topics import TopicCatalogue
from tests.e2e.conftest import ROOT, Stack, http, wait_for
from tests.e2e.fleet import Fleet, lease_violations, sweep

pytestmark = pytest.mark.e2e


def _section(output: str, title: str) -> Any:
    """The JSON a step of the smoke script printed after its `=== N. title ===` line."""
    start = output.index(title) + len(title)
    end = output.find("===", start)
    return json.loads(output[start : end if end != -1 else None].split("\n\n")[0].strip() or "null")


def test_seed_smoke_script_runs_unchanged_against_tadpole_up(make_stack: Any) -> None:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.fail("port 8080 is taken: the seed's smoke script only talks to :8080")
    stack: Stack = make_stack(port=8080)
    stack.start()

    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "smoke_test.sh")],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert run.returncode == 0, run.stderr
    job = _section(run.stdout, "=== 7. Check Job Status ===")
    assert job["status"] == "DONE"
    assert job["completedTasks"] == 1
    assert job["totalTasks"] == 1
    results = _section(run.stdout, "=== 8. Get Results ===")
    assert results["totalCompleted"] == 1
    assert results["results"][0]["fopt"] == 0.001
    assert results["results"][0]["algorithm"] == "PSO"
    spots = _section(run.stdout, "=== 9. List SPOTs ===")
    assert spots["spots"][0]["cpuLoad"] == 10.5
    assert spots["spots"][0]["totalCores"] == 4


def _settings(stack: Stack) -> Any:
    return load_settings(stack.env)


def _store(stack: Stack) -> TadpoleStore:
    return TadpoleStore(store_env(_settings(stack)))


def _rebuild_equals_live(stack: Stack, tmp_name: str) -> tuple[bool, str]:
    """Build both read models from the store alone and compare them with the live ones."""
    s = _settings(stack)
    store = _store(stack)
    try:
        first_event = StoreReader(store).first_event
        fresh_pg = PostgresReadModel(s.database_url, f"{tmp_name}_read", first_event)
        fresh_redis = RedisReadModel(s.redis_url, f"{tmp_name}r")
        live_pg = PostgresReadModel(s.database_url, s.read_schema, first_event)
        live_redis = RedisReadModel(s.redis_url, s.redis_prefix)
        for model in (fresh_pg, fresh_redis):
            model.reset()
            Projector(model, store, "unused:0", TopicCatalogue(tmp_name)).catch_up()
        pg_fresh, pg_live = fresh_pg.dump(), live_pg.dump()
        redis_fresh, redis_live = fresh_redis.dump(), live_redis.dump()
        pg_equal, redis_equal = pg_fresh == pg_live, redis_fresh == redis_live
        detail = (
            f"postgres equal={pg_equal} redis equal={redis_equal}; "
            f"postgres: {_differences(pg_fresh, pg_live)}; redis: {_differences(redis_fresh, redis_live)}"
        )
        for model in (fresh_pg, fresh_redis):
            model.reset()
        fresh_redis.client.delete(fresh_redis.keys.meta)
        for model in (fresh_pg, fresh_redis, live_pg, live_redis):
            model.close()
        return pg_equal and redis_equal, detail
    finally:
        store.close()


def _differences(rebuilt: dict[str, Any], live: dict[str, Any], most: int = 5) -> str:
    """What differs between a rebuilt and a live dump (a few entries, for the failure)."""
    out = []
    for key in sorted(set(rebuilt) | set(live)):
        a, b = rebuilt.get(key), live.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            only_a = [row for row in a if row not in b][:most]
            only_b = [row for row in b if row not in a][:most]
            out.append(f"{key}: rebuilt only {only_a} live only {only_b}")
        else:
            out.append(f"{key}: rebuilt {a!r} live {b!r}")
        if len(out) >= most:
            break
    return "; ".join(out) or "none"


def _converges(stack: Stack, tmp_name: str, timeout: float = 60) -> None:
    """Wait until the live read models equal a rebuild; fail with what differs last."""
    deadline = time.monotonic() + timeout
    while True:
        ok, detail = _rebuild_equals_live(stack, tmp_name)
        if ok:
            return
        if time.monotonic() >= deadline:
            pytest.fail(f"live read models still differ from a rebuild after {timeout}s: {detail}")
        time.sleep(0.5)


def _job_done(stack: Stack, job_id: str, total: int) -> bool:
    status, job = http("GET", f"{stack.base}/api/v1/jobs/{job_id}")
    return status == 200 and job["completedTasks"] == total


def test_killing_relay_and_projector_under_load_loses_nothing(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.env["TADPOLE_SPOT_TIMEOUT"] = "600"  # no spot goes DOWN while we compare
    stack.start()
    status, created = http("POST", stack.base + "/api/v1/jobs", sweep(3000))
    assert status == 201
    fleet = Fleet(stack.base, spots=6)
    fleet.start()
    try:
        killed: list[str] = []
        for role in ("relay", "projector-redis", "projector-postgres", "relay"):
            wait_for(lambda: len(fleet.acknowledged) > 300 * (len(killed) + 1), 60, "load")
            pid = stack.children()[role]
            subprocess.run(["kill", "-9", str(pid)], check=True)
            killed.append(role)
            wait_for(
                lambda role=role, pid=pid: stack.children().get(role) not in (None, pid),
                20,
                f"{role} restarted",
            )
        wait_for(lambda: _job_done(stack, created["jobId"], 3000), 120, "the job to finish")
    finally:
        fleet.join()

    assert len(fleet.acknowledged) == 3000
    _converges(stack, stack.extra["name"] + "x")
    store = _store(stack)
    try:
        events = [store.mapper.to_domain_event(n) for n in store.notifications(0, 1_000_000)]
    finally:
        store.close()
    assert lease_violations(events) == []
    assert sum(1 for e in events if type(e).__qualname__ == "TaskBlock.Claimed") > 0


def test_stopping_the_whole_stack_mid_load_keeps_every_acknowledged_change(
    make_stack: Any, tmp_path: Path
) -> None:
    stack: Stack = make_stack()
    # A claim whose answer was lost in the stop leaves tasks with a spot that never
    # hears of them; that spot re-registers, and SpotReaper frees its tasks soon.
    stack.env["TADPOLE_SPOT_TIMEOUT"] = "3"
    stack.env["TADPOLE_SPOT_REAPER_INTERVAL"] = "1"
    stack.start()
    status, created = http("POST", stack.base + "/api/v1/jobs", sweep(2000))
    assert status == 201
    job_id = created["jobId"]
    fleet = Fleet(stack.base, spots=6)
    fleet.start()
    try:
        wait_for(lambda: len(fleet.acknowledged) > 400, 60, "load before the stop")
        stack.stop(signal.SIGKILL)  # everything, the embedded broker too: it comes back empty
        before = set(fleet.acknowledged)
        stack.start()
        # Every change acknowledged before the stop shows in both read models afterwards.
        results = wait_for(
            lambda: (
                lambda r: (
                    r if r[0] == 200 and {x["taskId"] for x in r[1]["results"]} >= before else None
                )
            )(http("GET", f"{stack.base}/api/v1/jobs/{job_id}/results")),
            60,
            "acknowledged completions in the PostgreSQL read model",
        )
        assert {x["taskId"] for x in results[1]["results"]} >= before
        job = wait_for(
            lambda: (
                lambda r: r[1] if r[0] == 200 and r[1]["completedTasks"] >= len(before) else None
            )(http("GET", f"{stack.base}/api/v1/jobs/{job_id}")),
            60,
            "acknowledged completions in the Redis read model",
        )
        assert job["completedTasks"] >= len(before)
        wait_for(lambda: _job_done(stack, job_id, 2000), 120, "the job to finish after restart")
    finally:
        fleet.join()
    assert len(fleet.acknowledged) == 2000
    _converges(stack, stack.extra["name"] + "y")


def test_a_silent_spot_goes_down_and_its_task_is_claimed_again(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.env.update(TADPOLE_SPOT_TIMEOUT="1", TADPOLE_SPOT_REAPER_INTERVAL="0.5")
    stack.start()
    assert http("POST", stack.base + "/api/v1/jobs", sweep(1))[0] == 201
    silent = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.1"})[1]["spotId"]
    claim = http("POST", stack.base + "/internal/v1/tasks/claim", {"spotId": silent, "maxTasks": 1})
    task = claim[1]["tasks"][0]
    assert task["fenceToken"] == 1

    # The silent spot misses its heartbeats: SpotReaper marks it DOWN and frees the task.
    def spot_down() -> bool:
        spots = http("GET", stack.base + "/api/v1/spots")[1]["spots"]
        return any(s["id"] == silent and s["status"] == "DOWN" for s in spots)

    wait_for(spot_down, 30, "SpotReaper to mark the silent spot DOWN")
    other = http("POST", stack.base + "/internal/v1/hello", {"ipAddress": "10.0.0.2"})[1]["spotId"]
    again = http("POST", stack.base + "/internal/v1/tasks/claim", {"spotId": other, "maxTasks": 1})
    assert [t["id"] for t in again[1]["tasks"]] == [task["id"]]
    assert again[1]["tasks"][0]["fenceToken"] == 2
    late = http(
        "POST",
        f"{stack.base}/internal/v1/tasks/{task['id']}/complete",
        {"spotId": silent, "fopt": 1.0},
    )
    assert late == (409, {"success": False, "error": "task not assigned to this spot"})
    # A heartbeat brings the silent spot back UP.
    assert http("POST", stack.base + "/internal/v1/heartbeat", {"spotId": silent})[0] == 200
    wait_for(lambda: not spot_down(), 10, "the spot to come back UP")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_whole_tree_cleanly(make_stack: Any, sig: int) -> None:
    stack: Stack = make_stack()
    stack.start()
    children = stack.children()
    assert set(children) == {
        "api",
        "relay",
        "projector-postgres",
        "projector-redis",
        "sagas",
        "broker",
    }
    assert stack.process is not None
    stack.process.send_signal(sig)
    assert stack.process.wait(30) == 0
    assert "stopped" in stack.log.read_text()
    for role, pid in children.items():
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        ), role
