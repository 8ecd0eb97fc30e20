"""The API's edge: the agent key on every spelling of a worker path, values that must fit
everything downstream, HEAD and unknown methods, and queries that say they are stale.

Through falcon's TestClient over the same real processor and fakes as test_api.py.
"""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest

from domain.ids import parse_job_id
from domain.spots import LiveSpots
from tests.unit.test_api import Api, FakePostgres, FakeRedis, error, make_api, small_job


@pytest.fixture
def api() -> Api:
    return make_api()


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
KEY = {"X-Orhestra-Key": "secret"}

# ---- the agent key, however the path is spelled ---------------------------------------

#: Spellings of worker paths: each either reaches the worker resource (and then needs
#: the key) or reaches nothing at all (404).
SPELLINGS = [
    "/internal/v1/hello",
    "//internal/v1/hello",
    "///internal/v1/hello",
    "/internal//v1/hello",
    "/internal/v1//hello",
    "/internal/v1/./hello",
    "/internal/./v1/hello",
    "/api/../internal/v1/hello",
    "/api/v1/../../internal/v1/hello",
    "/intern%61l/v1/hello",
    "/%69nternal/v1/hello",
    "/internal%2Fv1/hello",
    "/internal%2fv1%2fhello",
    "/internal/v1/hello/",
    "/internal/v1/hello//",
    "//internal/v1/heartbeat",
    "//internal/v1/tasks/claim",
    "/internal//v1/tasks/claim",
    "/internal/v1/tasks%2Fclaim",
    "//internal/v1/tasks/{task}/complete",
    "//internal/v1/tasks/{task}/fail",
    "/internal/v1/tasks/{task}/complete/",
]


def _worker_body(spot: str) -> bytes:
    return json.dumps({"ipAddress": "10.0.0.1", "spotId": spot}).encode()


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_no_spelling_of_a_worker_path_gets_past_the_key(spelling: str) -> None:
    api = make_api(agent_key="secret")
    job = api.job()
    spot = api.hello()
    task = api.claim(spot)[0]["id"]
    path = spelling.format(task=task)
    submitted = len(api.writer.submitted)
    stored = api.position()

    refused = api.client.simulate_post(path, body=_worker_body(spot))

    assert api.writer.submitted[submitted:] == [], f"{path} reached the writer without the key"
    assert api.position() == stored
    keyed = api.client.simulate_post(path, body=_worker_body(spot), headers=KEY)
    if keyed.status_code == 404:  # routes nowhere, with or without the key
        assert refused.status_code == 404, path
        assert refused.json["error"].startswith("no route POST ")
    else:
        assert refused.status_code == 401, path
        assert refused.json == error("missing or wrong X-Orhestra-Key header")
        assert len(api.writer.submitted) > submitted, f"{path} with the key reached nothing"
    assert job


def test_the_doubled_slash_reaches_the_worker_resource_with_the_key() -> None:
    """The spelling that used to slip past the key is a real route: with the key it works."""
    api = make_api(agent_key="secret")

    result = api.client.simulate_post("//internal/v1/hello", body=_worker_body("x"), headers=KEY)

    assert result.status_code == 200
    assert len(api.processor.state(LiveSpots).spots) == 1


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "PURGE"])
def test_other_methods_on_worker_paths_reach_no_writer_without_the_key(method: str) -> None:
    api = make_api(agent_key="secret")

    result = api.client.simulate_request(method, "//internal/v1/hello", body=_worker_body("x"))

    assert result.status_code in (401, 405)
    assert api.writer.submitted == []


# ---- every value must fit downstream ---------------------------------------------------


class Scene:
    """A job, a spot and a claimed task: every command has something to act on."""

    def __init__(self) -> None:
        self.api = make_api()
        self.api.job()
        self.spot = self.api.hello()
        self.task = self.api.claim(self.spot)[0]["id"]
        self.submitted = len(self.api.writer.submitted)
        self.stored = self.api.position()

    def base(self, endpoint: str) -> tuple[str, dict[str, Any]]:
        spot = {"spotId": self.spot}
        return {
            "jobs": ("/api/v1/jobs", small_job()),
            "hello": ("/internal/v1/hello", {"ipAddress": "10.0.0.1"}),
            "heartbeat": ("/internal/v1/heartbeat", spot),
            "claim": ("/internal/v1/tasks/claim", spot),
            "complete": (f"/internal/v1/tasks/{self.task}/complete", spot),
            "fail": (f"/internal/v1/tasks/{self.task}/fail", spot),
        }[endpoint]

    def send(self, endpoint: str, fields: dict[str, Any]) -> Any:
        path, body = self.base(endpoint)
        return self.api.post(path, _deep_merge(body, fields))

    def send_raw(self, endpoint: str, field: str, literal: str) -> Any:
        """``field`` set to a JSON ``literal`` that json.dumps would not write (NaN, 1e400)."""
        path, body = self.base(endpoint)
        marker = "@@literal@@"
        text = json.dumps({**body, field: marker}).replace(f'"{marker}"', literal)
        return self.api.post(path, raw=text.encode())

    def assert_refused(self, result: Any, message: str) -> None:
        assert result.status_code == 400, result.json
        assert result.json == error(message)
        assert self.api.writer.submitted[self.submitted :] == []
        assert self.api.position() == self.stored


def _deep_merge(body: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(body)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


NUL = "a\u0000b"
NOT_NUL = "must not contain NUL (\\u0000)"
OUT_OF_64_BITS = f"must be from {INT64_MIN} to {INT64_MAX} (64 bits)"


@pytest.mark.parametrize(
    ("endpoint", "fields", "message"),
    [
        ("jobs", {"jarPath": NUL}, f"jarPath {NOT_NUL}"),
        ("jobs", {"mainClass": "\u0000"}, f"mainClass {NOT_NUL}"),
        ("jobs", {"algorithms": ["PSO", NUL]}, f"algorithms[1] {NOT_NUL}"),
        ("jobs", {"comment": NUL}, f"comment {NOT_NUL}"),
        ("hello", {"ipAddress": "10.0.0.1\u0000"}, f"ipAddress {NOT_NUL}"),
        ("heartbeat", {"spotId": NUL}, f"spotId {NOT_NUL}"),
        ("heartbeat", {"ipAddress": NUL}, f"ipAddress {NOT_NUL}"),
        ("claim", {"spotId": NUL}, f"spotId {NOT_NUL}"),
        ("complete", {"resultJson": '{"x": "\u0000"}'}, f"resultJson {NOT_NUL}"),
        ("complete", {"spotId": NUL}, f"spotId {NOT_NUL}"),
        ("fail", {"error": "Out\u0000OfMemory"}, f"error {NOT_NUL}"),
        ("fail", {"nested": {"deep": [NUL]}}, f"nested.deep[0] {NOT_NUL}"),
    ],
)
def test_nul_in_any_text_is_400_naming_the_field(
    endpoint: str, fields: dict[str, Any], message: str
) -> None:
    scene = Scene()

    scene.assert_refused(scene.send(endpoint, fields), message)


def test_nul_in_a_field_name_is_400() -> None:
    scene = Scene()

    scene.assert_refused(
        scene.send("hello", {"ip\u0000": 1}), f"a field name in the body {NOT_NUL}"
    )


def test_nul_in_the_idempotency_key_is_400() -> None:
    scene = Scene()

    result = scene.api.post("/api/v1/jobs", small_job(), headers={"Idempotency-Key": NUL})

    scene.assert_refused(result, f"Idempotency-Key {NOT_NUL}")


@pytest.mark.parametrize("action", ["complete", "fail"])
def test_nul_in_a_path_parameter_is_400(action: str) -> None:
    scene = Scene()

    result = scene.api.post(f"/internal/v1/tasks/{scene.task}%00/{action}", {"spotId": "x"})

    scene.assert_refused(result, f"task_id {NOT_NUL}")


@pytest.mark.parametrize(
    ("endpoint", "fields", "message"),
    [
        ("heartbeat", {"runningTasks": 2**63}, f"runningTasks {OUT_OF_64_BITS}"),
        ("heartbeat", {"totalCores": 2**64 - 1}, f"totalCores {OUT_OF_64_BITS}"),
        ("heartbeat", {"cpuLoad": 2**63}, f"cpuLoad {OUT_OF_64_BITS}"),
        ("claim", {"maxTasks": 2**63}, f"maxTasks {OUT_OF_64_BITS}"),
        ("complete", {"fenceToken": 2**63}, f"fenceToken {OUT_OF_64_BITS}"),
        ("complete", {"runtimeMs": 2**63}, f"runtimeMs {OUT_OF_64_BITS}"),
        ("complete", {"iter": 2**63}, f"iter {OUT_OF_64_BITS}"),
        ("fail", {"fenceToken": 2**63 + 5}, f"fenceToken {OUT_OF_64_BITS}"),
        ("jobs", {"iterations": {"min": 2**63}}, f"iterations.min {OUT_OF_64_BITS}"),
        ("jobs", {"agents": {"max": 2**63}}, f"agents.max {OUT_OF_64_BITS}"),
        ("jobs", {"dimension": {"step": 2**63}}, f"dimension.step {OUT_OF_64_BITS}"),
        # Past 64 bits orjson reads a float: no integer field takes one.
        ("heartbeat", {"runningTasks": 2**64}, "runningTasks must be an integer"),
        ("complete", {"iter": -(2**63) - 1}, "iter must be an integer"),
        ("complete", {"runtimeMs": 10**30}, "runtimeMs must be an integer"),
        ("jobs", {"iterations": {"min": -(2**63) - 1}}, "iterations.min must be an integer"),
    ],
)
def test_an_integer_past_64_bits_is_400_naming_the_field(
    endpoint: str, fields: dict[str, Any], message: str
) -> None:
    scene = Scene()

    scene.assert_refused(scene.send(endpoint, fields), message)


@pytest.mark.parametrize(
    ("endpoint", "field", "literal"),
    [
        ("heartbeat", "cpuLoad", "NaN"),
        ("heartbeat", "cpuLoad", "Infinity"),
        ("heartbeat", "cpuLoad", "-Infinity"),
        ("heartbeat", "cpuLoad", "1e400"),
        ("complete", "fopt", "NaN"),
        ("complete", "fopt", "-1e400"),
        ("complete", "fopt", "Infinity"),
        ("hello", "extra", "1e999"),
    ],
)
def test_a_non_finite_number_is_400_naming_the_field(
    endpoint: str, field: str, literal: str
) -> None:
    scene = Scene()

    scene.assert_refused(
        scene.send_raw(endpoint, field, literal), f"{field} must be a finite number"
    )


def test_the_64_bit_bounds_themselves_are_accepted() -> None:
    scene = Scene()

    beat = scene.send(
        "heartbeat", {"runningTasks": INT64_MAX, "totalCores": INT64_MAX, "cpuLoad": 1.5e308}
    )
    done = scene.send("complete", {"iter": INT64_MIN, "runtimeMs": INT64_MAX, "fopt": -1e308})

    assert (beat.status_code, done.status_code) == (200, 200), (beat.json, done.json)
    spot = scene.api.processor.state(LiveSpots).find(scene.spot)
    assert spot is not None
    assert spot.figures()[2:] == (INT64_MAX, INT64_MAX)


def test_malformed_json_that_is_not_a_number_keeps_its_message() -> None:
    scene = Scene()

    result = scene.api.post("/internal/v1/hello", raw=b'{"ipAddress": "x",}')

    assert result.status_code == 400
    assert result.json["error"].startswith("malformed JSON: ")
    assert scene.api.writer.submitted[scene.submitted :] == []


def test_a_body_nested_as_deep_as_orjson_reads_is_checked_without_recursion() -> None:
    scene = Scene()
    depth = 1000
    raw = b'{"ipAddress": "10.0.0.1", "x": ' + b"[" * depth + b'"\\u0000"' + b"]" * depth + b"}"

    result = scene.api.post("/internal/v1/hello", raw=raw)

    assert result.status_code == 400
    assert result.json["error"].endswith(NOT_NUL)
    assert scene.api.writer.submitted[scene.submitted :] == []


# ---- HEAD and methods falcon does not know ---------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/spots", "/api/v1/jobs/{job}"])
def test_head_is_served_wherever_get_is_without_a_body(api: Api, path: str) -> None:
    path = path.format(job=api.job())

    got = api.client.simulate_get(path)
    head = api.client.simulate_head(path)

    assert got.status_code == head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Length"] == str(len(got.content))
    assert head.headers["Content-Type"] == got.headers["Content-Type"]


def test_head_of_results_and_audit_is_served(api: Api) -> None:
    job = api.job()

    results = api.client.simulate_head(f"/api/v1/jobs/{job}/results")
    audit = api.client.simulate_head(f"/api/v1/audit/job/{job}/events")

    assert (results.status_code, audit.status_code) == (200, 200)
    assert results.content == audit.content == b""


def test_head_where_there_is_no_get_is_405(api: Api) -> None:
    result = api.client.simulate_head("/api/v1/jobs")

    assert result.status_code == 405
    assert result.headers["Allow"] == "POST, OPTIONS"


@pytest.mark.parametrize("method", ["FOO", "PURGE", "SEARCH", "BREW"])
def test_a_method_falcon_does_not_know_is_405_json(api: Api, method: str) -> None:
    result = api.client.simulate_request(method, "/api/v1/jobs")

    assert result.status_code == 405
    assert result.json == error(f"method {method} is not allowed on /api/v1/jobs")
    assert result.headers["Allow"] == "POST, OPTIONS"
    assert result.headers["Content-Type"].startswith("application/json")


def test_an_unknown_method_on_a_route_with_a_suffix_names_its_own_methods(api: Api) -> None:
    job = api.job()

    result = api.client.simulate_request("FOO", f"/api/v1/jobs/{job}")

    assert result.status_code == 405
    assert result.headers["Allow"] == "GET, HEAD, OPTIONS"


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
def test_a_known_method_a_route_lacks_is_405_json(api: Api, method: str) -> None:
    result = api.client.simulate_request(method, "/api/v1/health")

    assert result.status_code == 405
    assert result.json == error(f"method {method} is not allowed on /api/v1/health")
    assert result.headers["Allow"] == "GET, HEAD, OPTIONS"


# ---- stale queries say so ---------------------------------------------------------------


class Lagging:
    """A read model's ``applied`` that stays ``lag`` versions behind on every aggregate."""

    def __init__(self, view: FakeRedis | FakePostgres, lag: int | None):
        self.view = view
        self.lag = lag

    async def applied(self, uuids: list[UUID]) -> dict[UUID, int]:
        have = await self.view.applied(uuids)
        if self.lag is None:  # never saw anything
            return {}
        return {u: v - self.lag for u, v in have.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.view, name)


def _wanted(api: Api, job: str) -> dict[UUID, int]:
    uuid = parse_job_id(job)
    return api.writer.known_versions([uuid, *api.ctx.block_ids(uuid)])


def test_a_job_query_that_gave_up_waiting_says_how_stale_it_is(api: Api) -> None:
    job = api.job(small_job(tasks=3))
    spot = api.hello()
    api.claim(spot, 2)
    api.ctx.redis = Lagging(api.redis, None)  # type: ignore[assignment]
    behind = sum(_wanted(api, job).values())

    result = api.get(f"/api/v1/jobs/{job}")

    assert result.status_code == 200
    assert result.json["id"] == job
    assert result.headers["X-Tadpole-Stale"] == "true"
    assert result.headers["X-Tadpole-Stale-Events"] == str(behind)
    assert behind >= 3  # the job's version and its block's, claimed since it was made


def test_the_stale_count_is_what_the_view_still_lacks(api: Api) -> None:
    job = api.job()
    api.ctx.postgres = Lagging(api.postgres, 1)  # type: ignore[assignment]
    aggregates = len(_wanted(api, job))

    result = api.get(f"/api/v1/jobs/{job}/results")

    assert result.status_code == 200
    assert result.headers["X-Tadpole-Stale"] == "true"
    assert result.headers["X-Tadpole-Stale-Events"] == str(aggregates)


def test_a_spots_query_that_gave_up_waiting_says_how_stale_it_is(api: Api) -> None:
    api.hello()
    api.hello("10.0.0.2")
    api.ctx.postgres = Lagging(api.postgres, None)  # type: ignore[assignment]
    behind = sum(api.writer.known_versions(list(api.processor.state(LiveSpots).spots)).values())

    result = api.get("/api/v1/spots")

    assert result.status_code == 200
    assert result.headers["X-Tadpole-Stale"] == "true"
    assert result.headers["X-Tadpole-Stale-Events"] == str(behind)
    assert behind >= 2


@pytest.mark.parametrize(
    "path", ["/api/v1/jobs/{job}", "/api/v1/jobs/{job}/results", "/api/v1/spots"]
)
def test_a_fresh_answer_has_no_stale_headers(api: Api, path: str) -> None:
    job = api.job()
    api.hello()
    api.ctx.redis = Lagging(api.redis, 0)  # type: ignore[assignment]
    api.ctx.postgres = Lagging(api.postgres, 0)  # type: ignore[assignment]

    result = api.get(path.format(job=job))

    assert result.status_code == 200
    assert "X-Tadpole-Stale" not in result.headers
    assert "X-Tadpole-Stale-Events" not in result.headers
