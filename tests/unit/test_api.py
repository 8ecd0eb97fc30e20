"""The HTTP API: every resource through falcon's TestClient, over a real processor and store.

The writer here decides each command at once (no group commit, no event loop of
its own); the read models are fakes that read the processor's state, so a query
sees every write at once. One test at the end drives the real group-commit
writer through an ASGI conductor.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import psycopg_pool
import pytest
from falcon import testing

from api.app import create_app
from api.resources import ApiContext
from domain.family import Command, Result
from domain.ids import job_id, parse_job_id, parse_spot_id, parse_task_id, spot_id, task_id
from domain.jobs import OpenJobs
from domain.jobs.tasks import DONE, FAILED
from domain.processor import CommandProcessor
from domain.spots import LiveSpots
from eventstore.store import StorePort, TadpoleStore, memory_env
from service.bootstrap import bootstrap
from service.settings import Settings
from service.writer import GroupCommitWriter, StoreUnavailableError

MAX_ATTEMPTS = 3

#: The example of seed 003's contract: 3 × 5 × 5 × 5 tasks.
SEED_JOB: dict[str, Any] = {
    "jarPath": "/path/to/optimizer.jar",
    "mainClass": "com.example.OptRunner",
    "algorithms": ["PSO", "GA", "DE"],
    "iterations": {"min": 100, "max": 500, "step": 100},
    "agents": {"min": 10, "max": 50, "step": 10},
    "dimension": {"min": 2, "max": 10, "step": 2},
}


def small_job(tasks: int = 1, main_class: str = "com.test.Main") -> dict[str, Any]:
    return {
        "jarPath": "/test/opt.jar",
        "mainClass": main_class,
        "algorithms": ["PSO"],
        "iterations": {"min": 100, "max": 100, "step": 1},
        "agents": {"min": 10, "max": 10, "step": 1},
        "dimension": {"min": 1, "max": tasks, "step": 1},
    }


def error(message: str) -> dict[str, Any]:
    return {"success": False, "error": message}


# ---- test doubles -------------------------------------------------------------------


class FlakyPort(StorePort):
    """A store port whose next ``save`` raises when armed, before storing anything."""

    def __init__(self, store: TadpoleStore):
        super().__init__(store)
        self.armed = False

    def save(self, events: Sequence[Any], snapshots: Sequence[Any], *index: Any) -> None:
        if self.armed:
            self.armed = False
            raise ConnectionError("the database went away")
        super().save(events, snapshots, *index)


class DirectWriter:
    """The writer's contract without group commit: each command is its own batch."""

    def __init__(self, processor: CommandProcessor):
        self.processor = processor
        self.submitted: list[Command] = []
        self.ready = True

    async def submit(self, command: Command, disconnected: Any = None) -> Result:
        self.submitted.append(command)
        try:
            (result,) = self.processor.process([command], datetime.now(UTC))
        except Exception as failure:  # as GroupCommitWriter: the store refused the batch
            raise StoreUnavailableError(str(failure)) from failure
        return result

    def known_versions(self, uuids: Any) -> dict[UUID, int]:
        return self.processor.versions(uuids)

    async def wait_for_work(self, timeout: float) -> None:
        await asyncio.sleep(0)  # no other writer here: nothing can change meanwhile


class FakeRedis:
    """RedisViews' duck type: job progress from the processor's state, fixed counts."""

    def __init__(self, processor: CommandProcessor):
        self.processor = processor
        self.asked: list[list[UUID]] = []
        self.count_values: dict[str, int] = {}
        self.state_value = "connected"
        self.jobs_read = 0

    async def state(self) -> str:
        return self.state_value

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]:
        self.asked.append(list(uuids))
        return self.processor.versions(uuids)

    async def job(self, public_id: str) -> dict[str, Any] | None:
        self.jobs_read += 1
        return job_view(self.processor, public_id)

    async def counts(self) -> dict[str, int]:
        return dict(self.count_values)

    async def workflow_runs(self) -> dict[str, int]:
        return {}


def job_view(processor: CommandProcessor, public_id: str) -> dict[str, Any] | None:
    """A job as both read models show it, from the processor's state."""
    job = processor.state(OpenJobs).job(parse_job_id(public_id))
    if job is None:
        return None
    statuses = []
    for number in range(job.block_count):
        block = processor.state(OpenJobs).block(job, number)
        assert block is not None
        first, count = job.block_range(number)
        statuses += [block.view(i).status for i in range(first, first + count)]
    done, failed = statuses.count(DONE), statuses.count(FAILED)
    return {
        "id": public_id,
        "status": "RUNNING" if done + failed < job.total_tasks else "DONE",
        "totalTasks": job.total_tasks,
        "completedTasks": done,
        "failedTasks": failed,
        "createdAt": "2026-01-28T16:00:00Z",
    }


class FakePostgres:
    """PostgresViews' duck type: fixed rows; ``down`` makes ping fail."""

    def __init__(self, processor: CommandProcessor):
        self.processor = processor
        self.asked: list[list[UUID]] = []
        self.result_rows: dict[str, list[dict[str, Any]]] = {}
        self.spot_rows: list[dict[str, Any]] = []
        self.down = False
        self.count_values: dict[str, int] = {}
        self.jobs_read = 0

    async def job(self, public_id: str) -> dict[str, Any] | None:
        self.jobs_read += 1
        return job_view(self.processor, public_id)

    async def counts(self) -> dict[str, int]:
        return dict(self.count_values)

    async def ping(self) -> bool:
        if self.down:
            raise ConnectionError("connection refused")
        return True

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]:
        self.asked.append(list(uuids))
        return self.processor.versions(uuids)

    async def results(self, public_id: str) -> list[dict[str, Any]]:
        return list(self.result_rows.get(public_id, []))

    async def spots(self) -> list[dict[str, Any]]:
        if self.down:
            raise psycopg_pool.PoolTimeout("couldn't get a connection after 2.00 sec")
        return list(self.spot_rows)


@dataclass
class Api:
    store: TadpoleStore
    port: FlakyPort
    processor: CommandProcessor
    writer: DirectWriter
    redis: FakeRedis
    postgres: FakePostgres
    ctx: ApiContext
    client: testing.TestClient
    key: str

    def post(
        self,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> testing.Result:
        headers = dict(headers or {})
        if self.key and path.startswith("/internal/") and "X-Orhestra-Key" not in headers:
            headers["X-Orhestra-Key"] = self.key
        if raw is None:
            raw = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
        return self.client.simulate_post(path, body=raw, headers=headers)

    def get(self, path: str) -> testing.Result:
        return self.client.simulate_get(path)

    def position(self) -> int:
        return self.store.max_position()

    def job(self, body: dict[str, Any] | None = None, key: str | None = None) -> str:
        headers = {"Idempotency-Key": key} if key else None
        result = self.post("/api/v1/jobs", body or small_job(), headers=headers)
        assert result.status_code == 201, result.json
        public_id: str = result.json["jobId"]
        return public_id

    def hello(self, ip: str = "10.0.0.1") -> str:
        result = self.post("/internal/v1/hello", {"ipAddress": ip})
        assert result.status_code == 200, result.json
        public_id: str = result.json["spotId"]
        return public_id

    def claim(self, spot: str, n: int = 1) -> list[dict[str, Any]]:
        result = self.post("/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": n})
        assert result.status_code == 200, result.json
        tasks: list[dict[str, Any]] = result.json["tasks"]
        return tasks

    def complete(self, task: str, spot: str, **fields: Any) -> testing.Result:
        body = {"spotId": spot, "runtimeMs": 1500, "iter": 100, "fopt": 0.00123, **fields}
        return self.post(f"/internal/v1/tasks/{task}/complete", body)

    def fail(self, task: str, spot: str, **fields: Any) -> testing.Result:
        body = {"spotId": spot, "error": "OutOfMemoryError", **fields}
        return self.post(f"/internal/v1/tasks/{task}/fail", body)


def make_api(agent_key: str = "", max_sweep_tasks: int = 100_000) -> Api:
    """The API as production builds it (service.bootstrap), with a store in memory, a
    writer without group commit and fake views."""
    store = TadpoleStore(memory_env())
    port = FlakyPort(store)
    processor = CommandProcessor(port, MAX_ATTEMPTS, 5.0)
    writer = DirectWriter(processor)
    redis = FakeRedis(processor)
    postgres = FakePostgres(processor)
    settings = Settings(max_sweep_tasks=max_sweep_tasks, read_wait=0.05, agent_key=agent_key)
    tadpole = bootstrap(
        settings, store=store, processor=processor, writer=writer, redis=redis, postgres=postgres
    )
    ctx = tadpole.ctx
    client = testing.TestClient(create_app(ctx, agent_key))
    return Api(store, port, processor, writer, redis, postgres, ctx, client, agent_key)


@pytest.fixture
def api() -> Api:
    return make_api()


# ---- POST /api/v1/jobs ----------------------------------------------------------------


def test_create_job_answers_201_with_the_job_and_its_location(api: Api) -> None:
    result = api.post("/api/v1/jobs", SEED_JOB)

    assert result.status_code == 201
    assert set(result.json) == {"success", "jobId", "totalTasks"}
    assert result.json["success"] is True
    assert result.json["totalTasks"] == 375
    job = result.json["jobId"]
    parse_job_id(job)
    assert result.headers["Location"] == f"/api/v1/jobs/{job}"
    assert api.position() > 0


def test_created_job_reads_back(api: Api) -> None:
    job = api.job(SEED_JOB)

    result = api.get(f"/api/v1/jobs/{job}")

    assert result.status_code == 200
    assert result.json == {
        "id": job,
        "status": "RUNNING",
        "totalTasks": 375,
        "completedTasks": 0,
        "failedTasks": 0,
        "createdAt": "2026-01-28T16:00:00Z",
    }
    # Read-your-writes: the query waited for the job and its blocks' versions.
    uuid = parse_job_id(job)
    asked = set(api.redis.asked[-1])
    assert uuid in asked
    assert set(api.processor.state(OpenJobs).jobs[uuid].block_ids()) <= asked


def test_idempotent_retry_answers_200_with_the_same_job_and_stores_nothing(api: Api) -> None:
    key = {"Idempotency-Key": "order-42"}
    first = api.post("/api/v1/jobs", SEED_JOB, headers=key)
    assert first.status_code == 201
    stored = api.position()

    again = api.post("/api/v1/jobs", SEED_JOB, headers=key)

    assert again.status_code == 200
    assert again.json == {"success": True, "jobId": first.json["jobId"], "totalTasks": 375}
    assert again.headers["Location"] == first.headers["Location"]
    assert api.position() == stored


def test_same_idempotency_key_with_a_different_body_is_409(api: Api) -> None:
    key = {"Idempotency-Key": "order-42"}
    assert api.post("/api/v1/jobs", SEED_JOB, headers=key).status_code == 201
    stored = api.position()

    result = api.post("/api/v1/jobs", small_job(), headers=key)

    assert result.status_code == 409
    assert result.json == error("Idempotency-Key was used before with a different job")
    assert api.position() == stored


def test_different_idempotency_keys_make_different_jobs(api: Api) -> None:
    one = api.job(key="a")
    two = api.job(key="b")

    assert one != two


def test_idempotency_key_over_255_characters_is_400(api: Api) -> None:
    result = api.post("/api/v1/jobs", SEED_JOB, headers={"Idempotency-Key": "k" * 256})

    assert result.status_code == 400
    assert result.json == error("Idempotency-Key must be 1 to 255 characters")
    assert api.position() == 0


def _without(name: str) -> dict[str, Any]:
    return {k: v for k, v in SEED_JOB.items() if k != name}


def _with(name: str, value: Any) -> dict[str, Any]:
    return {**SEED_JOB, name: value}


def _with_range(name: str, **fields: Any) -> dict[str, Any]:
    return {**SEED_JOB, name: {**SEED_JOB[name], **fields}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_without("jarPath"), "jarPath is required"),
        (_with("jarPath", 7), "jarPath must be a string"),
        (_with("jarPath", "  "), "jarPath must not be empty"),
        (_without("mainClass"), "mainClass is required"),
        (_without("algorithms"), "algorithms is required"),
        (_with("algorithms", "PSO"), "algorithms must be a list of non-empty strings"),
        (_with("algorithms", ["PSO", ""]), "algorithms must be a list of non-empty strings"),
        (_with("algorithms", ["PSO", 3]), "algorithms must be a list of non-empty strings"),
        (_with("algorithms", []), "algorithms must name at least one algorithm"),
        (_without("iterations"), "iterations is required"),
        (_with("agents", [10, 50, 10]), "agents must be an object with min, max and step"),
        (_with_range("iterations", step="100"), "iterations.step must be an integer"),
        (_with_range("iterations", step=True), "iterations.step must be an integer"),
        (_with_range("agents", min=1.5), "agents.min must be an integer"),
        (_with_range("dimension", max=None), "dimension.max is required"),
        (_with_range("iterations", step=0), "iterations.step must be greater than zero"),
        (_with_range("agents", step=-10), "agents.step must be greater than zero"),
        (
            _with_range("dimension", min=10, max=2),
            "dimension is inverted: max 2 is below min 10",
        ),
    ],
)
def test_invalid_job_is_400_naming_the_field_and_stores_nothing(
    api: Api, body: dict[str, Any], message: str
) -> None:
    result = api.post("/api/v1/jobs", body)

    assert result.status_code == 400
    assert result.json == error(message)
    assert api.position() == 0
    assert api.writer.submitted == []


def test_sweep_above_the_cap_is_400() -> None:
    api = make_api(max_sweep_tasks=100)

    result = api.post("/api/v1/jobs", SEED_JOB)

    assert result.status_code == 400
    assert result.json == error("the sweep makes 375 tasks, above the cap of 100")
    assert api.position() == 0


def test_sweep_at_the_cap_is_accepted() -> None:
    api = make_api(max_sweep_tasks=375)

    assert api.post("/api/v1/jobs", SEED_JOB).status_code == 201


def test_malformed_json_is_400(api: Api) -> None:
    result = api.post("/api/v1/jobs", raw=b'{"jarPath": "/x.jar",')

    assert result.status_code == 400
    assert result.json["success"] is False
    assert result.json["error"].startswith("malformed JSON: ")
    assert api.position() == 0


def test_empty_body_is_400(api: Api) -> None:
    result = api.post("/api/v1/jobs", raw=b"")

    assert result.status_code == 400
    assert result.json["error"].startswith("malformed JSON: ")
    assert api.position() == 0


@pytest.mark.parametrize("body", [[SEED_JOB], "job", 375, None])
def test_body_that_is_not_a_json_object_is_400(api: Api, body: Any) -> None:
    result = api.post("/api/v1/jobs", body)

    assert result.status_code == 400
    assert result.json == error("the body must be a JSON object")
    assert api.position() == 0


def test_body_over_one_mebibyte_is_413(api: Api) -> None:
    body = _with("jarPath", "x" * (1024 * 1024))

    result = api.post("/api/v1/jobs", body)

    assert result.status_code == 413
    assert result.json == error(f"the body is over {1024 * 1024} bytes")
    assert api.position() == 0


def test_body_of_exactly_one_mebibyte_is_read(api: Api) -> None:
    raw = json.dumps(SEED_JOB).encode()
    raw = raw[:-1] + b" " * (1024 * 1024 - len(raw)) + b"}"
    assert len(raw) == 1024 * 1024

    result = api.post("/api/v1/jobs", raw=raw)

    assert result.status_code == 201


# ---- GET /api/v1/jobs/{id} and /results ------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/jobs/{}", "/api/v1/jobs/{}/results"])
@pytest.mark.parametrize(
    "job",
    ["not-a-job-id", "job-xyz", job_id(uuid4()), "JOB-" + uuid4().hex, spot_id(uuid4())],
)
def test_unknown_job_is_404(api: Api, path: str, job: str) -> None:
    result = api.get(path.format(job))

    assert result.status_code == 404
    assert result.json == error("job not found")


def test_results_list_what_the_read_model_holds(api: Api) -> None:
    job = api.job(small_job(2))
    row = {
        "taskId": task_id(parse_job_id(job), 0),
        "algorithm": "PSO",
        "iterations": 100,
        "fopt": 0.00123,
        "runtimeMs": 1500,
        "finishedAt": "2026-01-28T16:30:00Z",
    }
    api.postgres.result_rows[job] = [row]

    result = api.get(f"/api/v1/jobs/{job}/results")

    assert result.status_code == 200
    assert result.json == {"jobId": job, "totalCompleted": 1, "results": [row]}
    assert parse_job_id(job) in api.postgres.asked[-1]


def test_results_of_a_job_without_results_are_empty(api: Api) -> None:
    job = api.job()

    result = api.get(f"/api/v1/jobs/{job}/results")

    assert result.status_code == 200
    assert result.json == {"jobId": job, "totalCompleted": 0, "results": []}


def test_job_progress_after_a_completion_and_a_failure(api: Api) -> None:
    job = api.job(small_job(3))
    spot = api.hello()
    one, two = api.claim(spot, 2)
    assert api.complete(one["id"], spot).status_code == 200
    assert api.fail(two["id"], spot, retriable=False).status_code == 200

    result = api.get(f"/api/v1/jobs/{job}")

    assert result.status_code == 200
    assert (result.json["completedTasks"], result.json["failedTasks"]) == (1, 1)


# ---- health and spots ----------------------------------------------------------------


def test_health_reports_counts(api: Api) -> None:
    api.redis.count_values = {"spots_up": 3, "NEW": 42, "RUNNING": 12, "DONE": 7}

    result = api.get("/api/v1/health")

    assert result.status_code == 200
    assert result.json == {
        "status": "healthy",
        "database": "connected",
        "activeSpots": 3,
        "pendingTasks": 42,
        "runningTasks": 12,
        "redis": "connected",
        "workflowRuns": {},
    }


def test_health_with_no_counts_yet_reports_zeros(api: Api) -> None:
    result = api.get("/api/v1/health")

    assert result.status_code == 200
    assert result.json["activeSpots"] == result.json["pendingTasks"] == 0
    assert result.json["runningTasks"] == 0


def test_health_when_the_database_is_down_is_503(api: Api) -> None:
    api.postgres.down = True

    result = api.get("/api/v1/health")

    assert result.status_code == 503
    assert result.json == {
        "status": "unhealthy",
        "database": "disconnected",
        "redis": "connected",
        "error": "connection refused",
    }


@dataclass(frozen=True)
class FakeStage:
    name: str
    behind_events: int = 0
    behind_seconds: float = 0.0
    dead_letters: int = 0

    def lagging(self, limit: float) -> bool:
        return self.behind_events > 0 and self.behind_seconds > limit

    def as_json(self) -> dict[str, Any]:
        return {"behindEvents": self.behind_events, "deadLetters": self.dead_letters}


class FakePipeline:
    def __init__(self) -> None:
        self.stages_now = [FakeStage("relay"), FakeStage("projector.postgres")]

    def stages(self, now: datetime) -> tuple[int, list[FakeStage]]:
        return 42, list(self.stages_now)


def test_health_shows_each_step_and_is_healthy_while_all_keep_up(api: Api) -> None:
    api.ctx.pipeline = FakePipeline()
    api.ctx.broker_up = lambda: True

    result = api.get("/api/v1/health")

    assert result.status_code == 200
    assert result.json["status"] == "healthy" and "problems" not in result.json
    assert result.json["broker"] == "connected"
    assert result.json["storePosition"] == 42
    assert set(result.json["pipeline"]) == {"relay", "projector.postgres"}


@pytest.mark.parametrize(
    ("stage", "problem"),
    [
        (FakeStage("relay", behind_events=5, behind_seconds=11.0), "relay is 11s behind"),
        (FakeStage("relay", dead_letters=2), "relay holds 2 dead letters"),
    ],
)
def test_health_is_degraded_while_a_step_lags_or_holds_dead_letters(
    api: Api, stage: FakeStage, problem: str
) -> None:
    pipeline = FakePipeline()
    pipeline.stages_now = [stage]
    api.ctx.pipeline = pipeline

    result = api.get("/api/v1/health")

    assert result.status_code == 200
    assert result.json["status"] == "degraded"
    assert result.json["problems"] == [problem]


def test_health_is_not_degraded_by_a_lag_under_the_limit_or_with_nothing_waiting(api: Api) -> None:
    pipeline = FakePipeline()
    pipeline.stages_now = [
        FakeStage("relay", behind_events=3, behind_seconds=9.5),
        FakeStage("projector.redis", behind_events=0, behind_seconds=60.0),
    ]
    api.ctx.pipeline = pipeline

    assert api.get("/api/v1/health").json["status"] == "healthy"


def test_health_is_degraded_while_the_broker_is_down(api: Api) -> None:
    api.ctx.broker_up = lambda: False

    result = api.get("/api/v1/health")

    assert (result.json["status"], result.json["broker"]) == ("degraded", "down")


def test_health_counts_from_postgres_while_redis_rebuilds(api: Api) -> None:
    api.redis.state_value = "rebuilding"
    api.redis.count_values = {"spots_up": 99}  # replayed, wrong counts: not shown
    api.postgres.count_values = {"spots_up": 2, "NEW": 5, "RUNNING": 1}

    result = api.get("/api/v1/health")

    assert result.status_code == 200
    assert result.json["database"] == "connected"
    assert result.json["redis"] == "rebuilding"
    assert (result.json["activeSpots"], result.json["pendingTasks"]) == (2, 5)
    assert result.json["status"] == "degraded"


@pytest.mark.parametrize("state", ["rebuilding", "disconnected"])
def test_a_job_is_read_from_postgres_while_redis_is_away(api: Api, state: str) -> None:
    job = api.job()
    api.redis.state_value = state

    result = api.get(f"/api/v1/jobs/{job}")

    assert result.status_code == 200
    assert result.json["id"] == job
    assert (api.redis.jobs_read, api.postgres.jobs_read) == (0, 1)


def test_a_job_is_read_from_redis_when_it_is_connected(api: Api) -> None:
    job = api.job()

    assert api.get(f"/api/v1/jobs/{job}").status_code == 200
    assert (api.redis.jobs_read, api.postgres.jobs_read) == (1, 0)


def test_ready_once_the_store_answers_and_the_writer_recovered(api: Api) -> None:
    calls: list[int] = []

    async def ping() -> None:
        calls.append(1)

    api.ctx.store_ping = ping
    api.writer.ready = True

    result = api.get("/ready")

    assert (result.status_code, result.json, calls) == (200, {"ready": True}, [1])


def test_not_ready_while_the_store_is_away_or_the_writer_has_not_recovered(api: Api) -> None:
    async def ping() -> None:
        raise ConnectionError("connection refused")

    api.ctx.store_ping = ping
    api.writer.ready = False

    result = api.get("/ready")

    assert result.status_code == 503
    assert result.json["ready"] is False
    assert len(result.json["problems"]) == 2
    assert "connection refused" in result.json["problems"][0]


def test_a_query_while_the_read_model_is_unreachable_answers_503(api: Api) -> None:
    api.postgres.down = True

    result = api.get("/api/v1/spots")

    assert result.status_code == 503
    assert result.json["success"] is False
    assert "read model is unavailable" in result.json["error"]
    assert result.headers["Retry-After"] == "1"


def test_spots_lists_the_read_model_after_waiting_for_own_writes(api: Api) -> None:
    spot = api.hello("192.168.1.100")
    row = {
        "id": spot,
        "ipAddress": "192.168.1.100",
        "status": "UP",
        "cpuLoad": 0.0,
        "runningTasks": 0,
        "totalCores": 0,
        "lastHeartbeat": "2026-01-28T17:00:00Z",
    }
    api.postgres.spot_rows = [row]

    result = api.get("/api/v1/spots")

    assert result.status_code == 200
    assert result.json == {"spots": [row]}
    assert api.postgres.asked[-1] == list(api.processor.state(LiveSpots).spots)


# ---- hello and heartbeat -------------------------------------------------------------


def test_hello_registers_a_spot(api: Api) -> None:
    result = api.post("/internal/v1/hello", {"ipAddress": "192.168.1.100"})

    assert result.status_code == 200
    assert set(result.json) == {"spotId"}
    spot = api.processor.state(LiveSpots).find(result.json["spotId"])
    assert spot is not None
    assert spot.ip_address == "192.168.1.100"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "ipAddress is required"),
        ({"ipAddress": 10}, "ipAddress must be a string"),
        ({"ipAddress": ""}, "ipAddress must not be empty"),
        ({"ipAddress": "x" * 256}, "ipAddress must be at most 255 characters"),
    ],
)
def test_invalid_hello_is_400(api: Api, body: dict[str, Any], message: str) -> None:
    result = api.post("/internal/v1/hello", body)

    assert result.status_code == 400
    assert result.json == error(message)
    assert api.position() == 0


def test_heartbeat_answers_success_and_records_figures(api: Api) -> None:
    spot = api.hello()
    body = {
        "spotId": spot,
        "ipAddress": "192.168.1.100",
        "cpuLoad": 45.2,
        "runningTasks": 2,
        "totalCores": 8,
    }

    result = api.post("/internal/v1/heartbeat", body)

    assert result.status_code == 200
    assert result.json == {"success": True}
    stored = api.processor.state(LiveSpots).find(spot)
    assert stored is not None
    assert stored.figures() == ("192.168.1.100", 45.2, 2, 8)


def test_heartbeat_with_only_the_spot_id_keeps_the_figures(api: Api) -> None:
    spot = api.hello("10.0.0.9")

    result = api.post("/internal/v1/heartbeat", {"spotId": spot})

    assert result.status_code == 200
    assert result.json == {"success": True}


@pytest.mark.parametrize("spot", [spot_id(uuid4()), "spot-xyz", "garbage"])
def test_heartbeat_of_an_unknown_spot_is_404(api: Api, spot: str) -> None:
    result = api.post("/internal/v1/heartbeat", {"spotId": spot})

    assert result.status_code == 404
    assert result.json == error("spot not found")
    assert api.position() == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cpuLoad": "high"}, "cpuLoad must be a number"),
        ({"cpuLoad": True}, "cpuLoad must be a number"),
        ({"runningTasks": -1}, "runningTasks must be at least 0"),
        ({"runningTasks": 1.5}, "runningTasks must be an integer"),
        ({"totalCores": "8"}, "totalCores must be an integer"),
        ({"ipAddress": 1}, "ipAddress must be a string"),
    ],
)
def test_invalid_heartbeat_is_400(api: Api, fields: dict[str, Any], message: str) -> None:
    spot = api.hello()
    stored = api.position()

    result = api.post("/internal/v1/heartbeat", {"spotId": spot, **fields})

    assert result.status_code == 400
    assert result.json == error(message)
    assert api.position() == stored


def test_heartbeat_without_spot_id_is_400(api: Api) -> None:
    result = api.post("/internal/v1/heartbeat", {"cpuLoad": 1.0})

    assert result.status_code == 400
    assert result.json == error("spotId is required")


# ---- claim ---------------------------------------------------------------------------


def test_claim_returns_tasks_with_payload_and_fence_token(api: Api) -> None:
    job = api.job(SEED_JOB)
    spot = api.hello()

    result = api.post("/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": 2})

    assert result.status_code == 200
    tasks = result.json["tasks"]
    uuid = parse_job_id(job)
    assert [t["id"] for t in tasks] == [task_id(uuid, 0), task_id(uuid, 1)]
    assert [set(t) for t in tasks] == [{"id", "payload", "fenceToken"}] * 2
    assert [t["fenceToken"] for t in tasks] == [1, 1]
    assert isinstance(tasks[0]["payload"], str)
    assert json.loads(tasks[0]["payload"]) == {
        "alg": "PSO",
        "iterations": 100,
        "agents": 10,
        "dimension": 2,
        "jarPath": "/path/to/optimizer.jar",
        "mainClass": "com.example.OptRunner",
    }
    assert json.loads(tasks[1]["payload"])["dimension"] == 4


def test_claim_without_max_tasks_claims_one(api: Api) -> None:
    api.job(small_job(3))
    spot = api.hello()

    result = api.post("/internal/v1/tasks/claim", {"spotId": spot})

    assert result.status_code == 200
    assert len(result.json["tasks"]) == 1


def test_claim_with_nothing_to_do_is_an_empty_list(api: Api) -> None:
    spot = api.hello()

    result = api.post("/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": 100})

    assert result.status_code == 200
    assert result.json == {"tasks": []}


def test_claim_never_hands_out_a_task_twice(api: Api) -> None:
    api.job(small_job(3))
    one, two = api.hello(), api.hello()

    first = api.claim(one, 2)
    second = api.claim(two, 5)

    assert len(first) == 2
    assert len(second) == 1
    assert {t["id"] for t in first}.isdisjoint(t["id"] for t in second)


@pytest.mark.parametrize("spot", [spot_id(uuid4()), "spot-xyz", "garbage"])
def test_claim_of_an_unknown_spot_is_404(api: Api, spot: str) -> None:
    api.job()
    stored = api.position()

    result = api.post("/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": 1})

    assert result.status_code == 404
    assert result.json == error("spot not found")
    assert api.position() == stored


@pytest.mark.parametrize(
    ("max_tasks", "message"),
    [
        (0, "maxTasks must be at least 1"),
        (-3, "maxTasks must be at least 1"),
        (101, "maxTasks must be at most 100"),
        ("5", "maxTasks must be an integer"),
        (2.5, "maxTasks must be an integer"),
        (True, "maxTasks must be an integer"),
    ],
)
def test_claim_with_invalid_max_tasks_is_400(api: Api, max_tasks: Any, message: str) -> None:
    api.job()
    spot = api.hello()
    stored = api.position()

    result = api.post("/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": max_tasks})

    assert result.status_code == 400
    assert result.json == error(message)
    assert api.position() == stored


def test_claim_with_max_tasks_100_is_accepted(api: Api) -> None:
    api.job(SEED_JOB)
    spot = api.hello()

    assert len(api.claim(spot, 100)) == 100


# ---- complete and fail -----------------------------------------------------------------


def test_complete_then_complete_again(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)

    first = api.complete(task["id"], spot, fenceToken=task["fenceToken"], resultJson='{"ok":1}')
    stored = api.position()
    again = api.complete(task["id"], spot, fenceToken=task["fenceToken"])

    assert (first.status_code, first.json) == (200, {"success": True})
    assert (again.status_code, again.json) == (
        200,
        {"success": True, "message": "already completed"},
    )
    assert api.position() == stored


def test_complete_without_fence_token_or_figures_is_accepted(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)

    result = api.post(f"/internal/v1/tasks/{task['id']}/complete", {"spotId": spot})

    assert (result.status_code, result.json) == (200, {"success": True})


def test_fail_of_a_done_task_is_already_terminal(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    assert api.complete(task["id"], spot).status_code == 200

    result = api.fail(task["id"], spot)

    assert (result.status_code, result.json) == (
        200,
        {"success": True, "message": "already terminal"},
    )


def test_complete_of_a_failed_task_is_already_terminal(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    assert api.fail(task["id"], spot, retriable=False).json == {"success": True, "willRetry": False}

    result = api.complete(task["id"], spot)

    assert (result.status_code, result.json) == (
        200,
        {"success": True, "message": "already terminal"},
    )


def test_complete_by_another_spot_is_409(api: Api) -> None:
    api.job()
    holder, other = api.hello(), api.hello()
    (task,) = api.claim(holder)
    stored = api.position()

    completed = api.complete(task["id"], other)
    failed = api.fail(task["id"], other)

    assert (completed.status_code, completed.json) == (409, error("task not assigned to this spot"))
    assert (failed.status_code, failed.json) == (409, error("task not assigned to this spot"))
    assert api.position() == stored


def test_complete_with_claim_next_answers_with_the_next_tasks(api: Api) -> None:
    api.job(small_job(3))
    spot = api.hello()
    (task,) = api.claim(spot)

    result = api.complete(task["id"], spot, fenceToken=task["fenceToken"], claimNext=5)

    assert result.status_code == 200
    assert result.json["success"] is True
    assert len(result.json["tasks"]) == 2  # the other two, now this spot's
    assert [set(t) for t in result.json["tasks"]] == [{"id", "payload", "fenceToken"}] * 2
    assert task["id"] not in {t["id"] for t in result.json["tasks"]}
    assert api.claim(spot, 5) == []


def test_a_refused_report_still_answers_the_tasks_its_claim_took(api: Api) -> None:
    api.job(small_job(2))
    holder, other = api.hello(), api.hello()
    (task,) = api.claim(holder)

    result = api.complete(task["id"], other, claimNext=1)  # not other's task: refused

    assert result.status_code == 409
    assert result.json["error"] == "task not assigned to this spot"
    assert len(result.json["tasks"]) == 1  # the claim stands: the task is other's now
    assert api.claim(other, 5) == []


def test_a_refused_claim_next_says_why_beside_the_report(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    stranger = spot_id(uuid4())

    result = api.fail(task["id"], spot, fenceToken=task["fenceToken"], claimNext=1)
    unknown = api.complete(task["id"], stranger, claimNext=1)

    assert (result.status_code, result.json["success"]) == (200, True)
    assert result.json["willRetry"] is True and len(result.json["tasks"]) == 1
    assert unknown.status_code == 409
    assert unknown.json["tasks"] == [] and unknown.json["claimError"] == "spot not found"


@pytest.mark.parametrize(
    ("claim_next", "message"),
    [
        (101, "claimNext must be at most 100"),
        ("1", "claimNext must be an integer"),
        (-1, "claimNext must be at least 0"),
    ],
)
def test_an_invalid_claim_next_is_400_and_reports_nothing(
    api: Api, claim_next: Any, message: str
) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    stored = api.position()

    result = api.complete(task["id"], spot, claimNext=claim_next)

    assert (result.status_code, result.json) == (400, error(message))
    assert api.position() == stored


def test_complete_of_an_unclaimed_task_is_409(api: Api) -> None:
    job = api.job()
    spot = api.hello()

    result = api.complete(task_id(parse_job_id(job), 0), spot)

    assert (result.status_code, result.json) == (409, error("task not assigned to this spot"))


def test_stale_fence_token_is_409(api: Api) -> None:
    api.job()
    spot = api.hello()
    (first,) = api.claim(spot)
    assert api.fail(first["id"], spot).json == {"success": True, "willRetry": True}
    (second,) = api.claim(spot)
    assert second["id"] == first["id"]
    assert second["fenceToken"] == first["fenceToken"] + 1
    stored = api.position()

    completed = api.complete(first["id"], spot, fenceToken=first["fenceToken"])
    failed = api.fail(first["id"], spot, fenceToken=first["fenceToken"])

    assert (completed.status_code, completed.json) == (409, error("stale fencing token"))
    assert (failed.status_code, failed.json) == (409, error("stale fencing token"))
    assert api.position() == stored
    current = api.complete(second["id"], spot, fenceToken=second["fenceToken"])
    assert (current.status_code, current.json) == (200, {"success": True})


def _unknown_tasks() -> list[str]:
    unknown_job = uuid4()
    return [
        "garbage",
        "task-xyz",
        "task-001",
        task_id(unknown_job, 0),
        f"task-{unknown_job.hex}-00",
        f"task-{unknown_job.hex.upper()}-0",
    ]


@pytest.mark.parametrize("task", _unknown_tasks())
@pytest.mark.parametrize("action", ["complete", "fail"])
def test_unknown_task_is_404(api: Api, task: str, action: str) -> None:
    api.job()
    spot = api.hello()
    stored = api.position()

    result = api.post(f"/internal/v1/tasks/{task}/{action}", {"spotId": spot})

    assert result.status_code == 404
    assert result.json == error("task not found")
    assert api.position() == stored


def test_task_index_past_the_job_is_404(api: Api) -> None:
    job = api.job(small_job(3))
    spot = api.hello()

    result = api.complete(task_id(parse_job_id(job), 3), spot)

    assert (result.status_code, result.json) == (404, error("task not found"))


def test_task_of_a_spot_id_is_404(api: Api) -> None:
    spot = api.hello()

    result = api.complete(task_id(parse_spot_id(spot), 0), spot)

    assert (result.status_code, result.json) == (404, error("task not found"))


def test_retriable_failures_retry_twice_then_fail_for_good(api: Api) -> None:
    job = api.job()
    spot = api.hello()
    answers = []
    for _ in range(MAX_ATTEMPTS):
        (task,) = api.claim(spot)
        result = api.fail(task["id"], spot, retriable=True, fenceToken=task["fenceToken"])
        assert result.status_code == 200
        answers.append(result.json)

    assert answers == [
        {"success": True, "willRetry": True},
        {"success": True, "willRetry": True},
        {"success": True, "willRetry": False},
    ]
    assert api.claim(spot) == []
    assert api.get(f"/api/v1/jobs/{job}").json["failedTasks"] == 1


def test_retriable_defaults_to_true(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)

    result = api.post(f"/internal/v1/tasks/{task['id']}/fail", {"spotId": spot})

    assert (result.status_code, result.json) == (200, {"success": True, "willRetry": True})


def test_non_retriable_failure_is_final(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)

    result = api.fail(task["id"], spot, retriable=False)

    assert (result.status_code, result.json) == (200, {"success": True, "willRetry": False})
    assert api.claim(spot) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"spotId": None}, "spotId is required"),
        ({"spotId": 5}, "spotId must be a string"),
        ({"runtimeMs": "x"}, "runtimeMs must be an integer"),
        ({"runtimeMs": -1}, "runtimeMs must be at least 0"),
        ({"iter": "100"}, "iter must be an integer"),
        ({"fopt": "x"}, "fopt must be a number"),
        ({"fopt": False}, "fopt must be a number"),
        ({"fenceToken": "1"}, "fenceToken must be an integer"),
        ({"fenceToken": -1}, "fenceToken must be at least 0"),
        ({"resultJson": {"converged": True}}, "resultJson must be a string"),
        ({"resultJson": "x" * (64 * 1024 + 1)}, "resultJson must be at most 65536 characters"),
    ],
)
def test_invalid_complete_is_400_naming_the_field(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    stored = api.position()
    body = {k: v for k, v in {"spotId": spot, **fields}.items() if v is not None}

    result = api.post(f"/internal/v1/tasks/{task['id']}/complete", body)

    assert result.status_code == 400
    assert result.json == error(message)
    assert api.position() == stored


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"retriable": "yes"}, "retriable must be true or false"),
        ({"retriable": 1}, "retriable must be true or false"),
        ({"error": 500}, "error must be a string"),
        ({"fenceToken": 1.0}, "fenceToken must be an integer"),
        ({"spotId": ["spot"]}, "spotId must be a string"),
    ],
)
def test_invalid_fail_is_400_naming_the_field(
    api: Api, fields: dict[str, Any], message: str
) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    stored = api.position()

    result = api.post(f"/internal/v1/tasks/{task['id']}/fail", {"spotId": spot, **fields})

    assert result.status_code == 400
    assert result.json == error(message)
    assert api.position() == stored


@pytest.mark.parametrize(
    "path",
    [
        "/internal/v1/hello",
        "/internal/v1/heartbeat",
        "/internal/v1/tasks/claim",
        "/internal/v1/tasks/task-" + "0" * 32 + "-0/complete",
        "/internal/v1/tasks/task-" + "0" * 32 + "-0/fail",
    ],
)
@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"[]", "the body must be a JSON object"), (b"{nope", None)],
)
def test_internal_bodies_must_be_json_objects(
    api: Api, path: str, raw: bytes, message: str | None
) -> None:
    result = api.post(path, raw=raw)

    assert result.status_code == 400
    assert result.json["success"] is False
    if message is None:
        assert result.json["error"].startswith("malformed JSON: ")
    else:
        assert result.json["error"] == message


# ---- agent key -----------------------------------------------------------------------


def test_internal_api_needs_the_agent_key() -> None:
    api = make_api(agent_key="secret")
    path = "/internal/v1/hello"
    body = json.dumps({"ipAddress": "10.0.0.1"})

    missing = api.client.simulate_post(path, body=body)
    wrong = api.client.simulate_post(path, body=body, headers={"X-Orhestra-Key": "secreT"})
    right = api.client.simulate_post(path, body=body, headers={"X-Orhestra-Key": "secret"})

    for refused in (missing, wrong):
        assert refused.status_code == 401
        assert refused.json == error("missing or wrong X-Orhestra-Key header")
        assert refused.headers["Content-Type"].startswith("application/json")
    assert right.status_code == 200
    assert set(right.json) == {"spotId"}
    assert api.writer.submitted != []
    assert len(api.processor.state(LiveSpots).spots) == 1


def test_refused_internal_requests_store_nothing() -> None:
    api = make_api(agent_key="secret")
    job = api.job()
    stored = api.position()
    task = task_id(parse_job_id(job), 0)

    for path in (
        "/internal/v1/hello",
        "/internal/v1/heartbeat",
        "/internal/v1/tasks/claim",
        f"/internal/v1/tasks/{task}/complete",
        f"/internal/v1/tasks/{task}/fail",
    ):
        result = api.client.simulate_post(path, json={"ipAddress": "10.0.0.1", "spotId": "x"})
        assert result.status_code == 401, path
        assert result.json == error("missing or wrong X-Orhestra-Key header")

    assert api.position() == stored


def test_public_api_needs_no_agent_key() -> None:
    api = make_api(agent_key="secret")

    created = api.client.simulate_post("/api/v1/jobs", json=SEED_JOB)
    health = api.client.simulate_get("/api/v1/health")

    assert created.status_code == 201
    assert health.status_code == 200


# ---- routing ---------------------------------------------------------------------------


def test_unknown_route_is_404_json(api: Api) -> None:
    result = api.get("/api/v1/nothing")

    assert result.status_code == 404
    assert result.json == error("no route GET /api/v1/nothing")


def test_wrong_method_is_405_json(api: Api) -> None:
    result = api.client.simulate_delete("/api/v1/jobs")

    assert result.status_code == 405
    assert result.json == error("method DELETE is not allowed on /api/v1/jobs")
    assert "POST" in result.headers["Allow"]


def test_get_on_a_command_route_is_405(api: Api) -> None:
    result = api.get("/internal/v1/tasks/claim")

    assert result.status_code == 405
    assert result.json == error("method GET is not allowed on /internal/v1/tasks/claim")


def test_trailing_slash_is_the_same_route(api: Api) -> None:
    assert api.get("/api/v1/health/").status_code == 200


# ---- audit -----------------------------------------------------------------------------


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def test_task_audit_lists_its_own_part_of_each_block_event(api: Api) -> None:
    job = api.job(small_job(3))
    one, two = api.hello(), api.hello()
    (mine,) = api.claim(one)
    (theirs,) = api.claim(two)
    assert api.complete(theirs["id"], two, fopt=9.5).status_code == 200
    assert api.complete(mine["id"], one, fopt=0.25, runtimeMs=1200, iter=77).status_code == 200

    result = api.get(f"/api/v1/audit/task/{mine['id']}/events")

    assert result.status_code == 200
    assert result.json["aggregate"] == "task"
    assert result.json["id"] == mine["id"]
    events = result.json["events"]
    assert _types(events) == ["TaskBlock.Created", "TaskBlock.Claimed", "TaskBlock.Completed"]
    assert [e["version"] for e in events] == [1, 2, 5]
    assert events[0]["data"] == {"job_id": job}
    claimed, completed = events[1]["data"], events[2]["data"]
    assert claimed["job_id"] == job
    assert claimed["holder"] == one
    assert claimed["fenceToken"] == mine["fenceToken"] == 1
    assert claimed["attempt"] == 1
    assert completed["holder"] == one
    assert completed["fopt"] == 0.25
    assert completed["runtimeMs"] == 1200
    assert completed["iter"] == 77
    assert "resultJson" in completed
    for event in events:
        datetime.fromisoformat(event["timestamp"])


def test_task_audit_of_a_retried_task_shows_the_failure(api: Api) -> None:
    api.job()
    spot = api.hello()
    (task,) = api.claim(spot)
    assert api.fail(task["id"], spot, error="OutOfMemoryError").status_code == 200

    events = api.get(f"/api/v1/audit/task/{task['id']}/events").json["events"]

    assert _types(events) == ["TaskBlock.Created", "TaskBlock.Claimed", "TaskBlock.Failed"]
    assert events[2]["data"]["error"] == "OutOfMemoryError"
    assert events[2]["data"]["retried"] is True
    assert events[2]["data"]["holder"] == spot


def test_job_audit_has_the_job_created_event(api: Api) -> None:
    job = api.job(SEED_JOB, key="audit-me")

    result = api.get(f"/api/v1/audit/job/{job}/events")

    assert result.status_code == 200
    assert result.json["aggregate"] == "job"
    assert result.json["id"] == job
    (created,) = result.json["events"]
    assert created["type"] == "Job.Created"
    assert created["version"] == 1
    assert created["data"]["total_tasks"] == 375
    assert created["data"]["idempotency_key"] == "audit-me"


def test_spot_audit_lists_its_events(api: Api) -> None:
    spot = api.hello("10.1.2.3")
    beat = {"spotId": spot, "cpuLoad": 12.5, "runningTasks": 1, "totalCores": 4}
    assert api.post("/internal/v1/heartbeat", beat).status_code == 200

    result = api.get(f"/api/v1/audit/spot/{spot}/events")

    assert result.status_code == 200
    assert result.json["id"] == spot
    events = result.json["events"]
    assert _types(events) == ["Spot.Registered", "Spot.HeartbeatRecorded"]
    assert events[0]["data"]["ip_address"] == "10.1.2.3"
    assert events[1]["data"]["cpu_load"] == 12.5


def test_audit_of_an_unknown_aggregate_kind_is_404(api: Api) -> None:
    job = api.job()

    result = api.get(f"/api/v1/audit/block/{job}/events")

    assert result.status_code == 404
    assert result.json == error(
        "unknown aggregate 'block': use workflow-run, workflow-task, job, task, spot, "
        "target, context, agent, mesh, saga or system"
    )


@pytest.mark.parametrize(
    ("kind", "entity"),
    [
        ("job", job_id(uuid4())),
        ("job", "not-a-job-id"),
        ("spot", spot_id(uuid4())),
        ("spot", "spot-xyz"),
        ("task", task_id(uuid4(), 0)),
        ("task", "task-xyz"),
    ],
)
def test_audit_of_an_unknown_id_is_404(api: Api, kind: str, entity: str) -> None:
    api.job()
    api.hello()

    result = api.get(f"/api/v1/audit/{kind}/{entity}/events")

    assert result.status_code == 404
    assert result.json == error(f"{kind} not found")


def test_audit_of_a_task_past_the_end_of_its_job_is_404(api: Api) -> None:
    job = api.job(small_job(2))

    result = api.get(f"/api/v1/audit/task/{task_id(parse_job_id(job), 2)}/events")

    assert (result.status_code, result.json) == (404, error("task not found"))


def test_audit_does_not_answer_for_another_kind_of_aggregate(api: Api) -> None:
    job = api.job()
    spot = api.hello()
    as_spot = api.get(f"/api/v1/audit/spot/{spot_id(parse_job_id(job))}/events")
    as_job = api.get(f"/api/v1/audit/job/{job_id(parse_spot_id(spot))}/events")

    assert (as_spot.status_code, as_spot.json) == (404, error("spot not found"))
    assert (as_job.status_code, as_job.json) == (404, error("job not found"))


# ---- the store refusing a batch ------------------------------------------------------


SERVICE_UNAVAILABLE = error("the event store is unavailable; nothing was written, retry shortly")


def test_store_failure_is_503_and_nothing_is_stored(api: Api) -> None:
    api.port.armed = True

    result = api.post("/api/v1/jobs", SEED_JOB)

    assert result.status_code == 503
    assert result.json == SERVICE_UNAVAILABLE
    assert result.headers["Retry-After"] == "1"
    assert api.position() == 0
    # The processor reloads from the store and the next request is served.
    assert api.post("/api/v1/jobs", SEED_JOB).status_code == 201


def test_store_failure_on_a_worker_request_is_503(api: Api) -> None:
    api.job()
    spot = api.hello()
    stored = api.position()
    api.port.armed = True

    result = api.post("/internal/v1/tasks/claim", {"spotId": spot, "maxTasks": 1})

    assert (result.status_code, result.json) == (503, SERVICE_UNAVAILABLE)
    assert api.position() == stored
    # Nothing was claimed: the same task is claimed afresh, with the first fence.
    (task,) = api.claim(spot)
    assert parse_task_id(task["id"]).index == 0
    assert task["fenceToken"] == 1


def test_writer_raising_store_unavailable_is_503(api: Api) -> None:
    async def refuse(command: Command, disconnected: Any = None) -> Result:
        raise StoreUnavailableError("connection refused")

    api.writer.submit = refuse  # type: ignore[method-assign]

    result = api.post("/internal/v1/hello", {"ipAddress": "10.0.0.1"})

    assert (result.status_code, result.json) == (503, SERVICE_UNAVAILABLE)


# ---- the real group-commit writer ------------------------------------------------------


@pytest.fixture
async def conducted() -> Any:
    """The app over the real GroupCommitWriter, in this test's event loop."""
    api = make_api()
    writer = GroupCommitWriter(api.processor)
    api.ctx.writer = writer
    writer.start()
    try:
        async with testing.ASGIConductor(create_app(api.ctx)) as conductor:
            yield api, writer, conductor
    finally:
        await writer.stop()


async def test_through_the_group_commit_writer(conducted: Any) -> None:
    api, writer, conductor = conducted

    created = await conductor.simulate_post("/api/v1/jobs", json=small_job(2))
    assert created.status_code == 201
    job = created.json["jobId"]
    assert parse_job_id(job) in writer.versions
    hello = await conductor.simulate_post("/internal/v1/hello", json={"ipAddress": "10.0.0.1"})
    spot = hello.json["spotId"]
    claim = await conductor.simulate_post(
        "/internal/v1/tasks/claim", json={"spotId": spot, "maxTasks": 5}
    )
    tasks = claim.json["tasks"]
    assert [t["id"] for t in tasks] == [task_id(parse_job_id(job), i) for i in (0, 1)]
    done = await conductor.simulate_post(
        f"/internal/v1/tasks/{tasks[0]['id']}/complete",
        json={"spotId": spot, "fenceToken": tasks[0]["fenceToken"]},
    )
    assert (done.status_code, done.json) == (200, {"success": True})
    progress = await conductor.simulate_get(f"/api/v1/jobs/{job}")
    assert progress.json["completedTasks"] == 1

    stored = api.position()
    api.port.armed = True
    refused = await conductor.simulate_post(
        f"/internal/v1/tasks/{tasks[1]['id']}/complete", json={"spotId": spot}
    )
    assert (refused.status_code, refused.json) == (503, SERVICE_UNAVAILABLE)
    assert refused.headers["Retry-After"] == "1"
    assert api.position() == stored


async def test_group_commit_writer_serves_again_after_a_refused_batch(conducted: Any) -> None:
    api, _, conductor = conducted
    api.port.armed = True
    refused = await conductor.simulate_post("/internal/v1/hello", json={"ipAddress": "10.0.0.1"})
    assert refused.status_code == 503

    for _ in range(3):
        again = await conductor.simulate_post("/internal/v1/hello", json={"ipAddress": "h"})
        assert again.status_code == 200, again.json
