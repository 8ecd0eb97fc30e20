"""Sweeps (the Cartesian product a job's tasks are) and Tadpole's public ids."""

from __future__ import annotations

import itertools
import json
from uuid import UUID, uuid4

import pytest

from domain.ids import (
    UnknownIdError,
    block_id,
    job_for_key,
    job_id,
    parse_job_id,
    parse_spot_id,
    parse_task_id,
    spot_id,
    task_id,
)
from domain.jobs.sweeps import Range, Sweep, SweepError, TaskParams

#: A byte cap no test sweep reaches unless it means to.
ROOMY = 1 << 20


def seed_sweep() -> Sweep:
    """The request of the seed's ``POST /api/v1/jobs`` example."""
    return Sweep(
        jar_path="/path/to/optimizer.jar",
        main_class="com.example.OptRunner",
        algorithms=("PSO", "GA", "DE"),
        iterations=Range(100, 500, 100),
        agents=Range(10, 50, 10),
        dimension=Range(2, 10, 2),
    )


def with_(sweep: Sweep, **changes: object) -> Sweep:
    data = {
        "jar_path": sweep.jar_path,
        "main_class": sweep.main_class,
        "algorithms": sweep.algorithms,
        "iterations": sweep.iterations,
        "agents": sweep.agents,
        "dimension": sweep.dimension,
    }
    data.update(changes)
    return Sweep(**data)  # type: ignore[arg-type]


# ---- counting ---------------------------------------------------------------------


def test_seed_example_makes_375_tasks() -> None:
    sweep = seed_sweep()
    assert sweep.shape == (3, 5, 5, 5)
    assert sweep.total_tasks == 375


def test_range_is_inclusive_of_max_when_the_step_lands_on_it() -> None:
    assert list(Range(100, 500, 100).values()) == [100, 200, 300, 400, 500]


def test_range_stops_below_max_when_the_step_overshoots() -> None:
    assert list(Range(1, 10, 4).values()) == [1, 5, 9]


def test_single_value_ranges_make_a_single_task() -> None:
    sweep = with_(
        seed_sweep(),
        algorithms=("PSO",),
        iterations=Range(100, 100, 100),
        agents=Range(10, 10, 10),
        dimension=Range(2, 2, 1),
    )
    assert sweep.total_tasks == 1
    assert sweep.params(0) == TaskParams("PSO", 100, 10, 2)


# ---- order ------------------------------------------------------------------------


def test_dimension_varies_fastest_and_algorithm_slowest() -> None:
    sweep = seed_sweep()
    assert sweep.params(0) == TaskParams("PSO", 100, 10, 2)
    assert sweep.params(1) == TaskParams("PSO", 100, 10, 4)
    assert sweep.params(5) == TaskParams("PSO", 100, 20, 2)
    assert sweep.params(25) == TaskParams("PSO", 200, 10, 2)
    assert sweep.params(125) == TaskParams("GA", 100, 10, 2)
    assert sweep.params(374) == TaskParams("DE", 500, 50, 10)


def test_indexes_enumerate_the_cartesian_product_in_order_without_repeats() -> None:
    sweep = seed_sweep()
    expected = [
        TaskParams(a, i, g, d)
        for a, i, g, d in itertools.product(
            sweep.algorithms,
            sweep.iterations.values(),
            sweep.agents.values(),
            sweep.dimension.values(),
        )
    ]
    assert [sweep.params(n) for n in range(sweep.total_tasks)] == expected
    assert len(set(expected)) == 375


# ---- payload ----------------------------------------------------------------------


def test_payload_is_compact_json_with_the_spot_fields() -> None:
    sweep = seed_sweep()
    text = sweep.payload(131)  # GA (125) + agents 20 (5) + dimension 4 (1)
    assert json.loads(text) == {
        "alg": "GA",
        "iterations": 100,
        "agents": 20,
        "dimension": 4,
        "jarPath": "/path/to/optimizer.jar",
        "mainClass": "com.example.OptRunner",
    }
    assert " " not in text
    assert list(json.loads(text)) == [
        "alg",
        "iterations",
        "agents",
        "dimension",
        "jarPath",
        "mainClass",
    ]


def test_payload_matches_params_for_every_task() -> None:
    sweep = seed_sweep()
    for n in range(sweep.total_tasks):
        data = json.loads(sweep.payload(n))
        p = sweep.params(n)
        assert (data["alg"], data["iterations"], data["agents"], data["dimension"]) == (
            p.algorithm,
            p.iterations,
            p.agents,
            p.dimension,
        )


# ---- errors -----------------------------------------------------------------------


def test_a_valid_sweep_at_the_cap_passes_the_check() -> None:
    seed_sweep().check(max_tasks=375, max_bytes=ROOMY)


def test_a_sweep_above_the_cap_is_refused() -> None:
    with pytest.raises(SweepError, match="375 tasks, above the cap of 374"):
        seed_sweep().check(max_tasks=374, max_bytes=ROOMY)


def test_empty_algorithms_are_refused() -> None:
    with pytest.raises(SweepError, match="algorithms"):
        with_(seed_sweep(), algorithms=()).check(max_tasks=10_000, max_bytes=ROOMY)


@pytest.mark.parametrize("name", ["iterations", "agents", "dimension"])
def test_an_inverted_range_is_refused(name: str) -> None:
    sweep = with_(seed_sweep(), **{name: Range(10, 9, 1)})
    with pytest.raises(SweepError, match=f"{name} is inverted"):
        sweep.check(max_tasks=10_000, max_bytes=ROOMY)


@pytest.mark.parametrize("step", [0, -1])
@pytest.mark.parametrize("name", ["iterations", "agents", "dimension"])
def test_a_step_that_is_not_positive_is_refused(name: str, step: int) -> None:
    sweep = with_(seed_sweep(), **{name: Range(1, 10, step)})
    with pytest.raises(SweepError, match=rf"{name}\.step must be greater than zero"):
        sweep.check(max_tasks=10_000, max_bytes=ROOMY)


def test_a_sweep_above_the_byte_cap_is_refused_with_both_figures() -> None:
    sweep = seed_sweep()
    size = len(sweep.to_json())
    sweep.check(max_tasks=375, max_bytes=size)
    with pytest.raises(
        SweepError, match=rf"{size} bytes as canonical JSON, above the cap of {size - 1} bytes"
    ):
        sweep.check(max_tasks=375, max_bytes=size - 1)


def test_the_byte_cap_counts_escaped_non_ascii_text() -> None:
    sweep = with_(seed_sweep(), algorithms=("é" * 100,))
    size = len(sweep.to_json().encode())
    assert size >= len(seed_sweep().to_json()) + 500  # each é is \u00e9 in the stored text
    with pytest.raises(SweepError, match="bytes as canonical JSON"):
        sweep.check(max_tasks=375, max_bytes=size - 1)


def test_many_algorithm_names_within_the_task_cap_are_refused_by_the_byte_cap() -> None:
    sweep = with_(
        seed_sweep(),
        algorithms=tuple(f"alg{n:06d}" for n in range(100_000)),
        iterations=Range(1, 1, 1),
        agents=Range(1, 1, 1),
        dimension=Range(1, 1, 1),
    )
    with pytest.raises(SweepError, match="above the cap of 262144 bytes"):
        sweep.check(max_tasks=100_000, max_bytes=256 * 1024)


# ---- range arithmetic -------------------------------------------------------------


def test_range_counts_its_values_arithmetically() -> None:
    for r in (Range(100, 500, 100), Range(1, 10, 4), Range(-5, 5, 3), Range(7, 7, 1)):
        assert r.count == len(r.values())
        assert [r.value(n) for n in range(r.count)] == list(r.values())


def test_a_range_of_the_widest_values_counts_without_overflow() -> None:
    widest = Range(-(2**31), 2**31 - 1, 1)
    assert widest.count == 2**32
    sweep = with_(seed_sweep(), iterations=widest)
    with pytest.raises(SweepError, match=r"makes \d+ tasks, above the cap"):
        sweep.check(max_tasks=100_000, max_bytes=ROOMY)


@pytest.mark.parametrize(
    ("part", "bad"),
    [
        ("min", -(2**31) - 1),
        ("max", 2**31),
        ("max", 9223372036854775807),
        ("max", 2**64),
        ("min", -(2**63)),
        ("step", 2**31),
    ],
)
@pytest.mark.parametrize("name", ["iterations", "agents", "dimension"])
def test_a_range_number_outside_a_signed_32_bit_integer_is_refused(
    name: str, part: str, bad: int
) -> None:
    numbers = {"min": 1, "max": 1, "step": 1, part: bad}
    if part == "min":
        numbers["max"] = max(bad, 1)
    sweep = with_(seed_sweep(), **{name: Range(**numbers)})
    with pytest.raises(SweepError, match=rf"^{name}\.{part} is {bad}, outside "):
        sweep.check(max_tasks=100_000, max_bytes=ROOMY)


def test_the_extreme_values_that_fit_are_accepted_and_reach_the_payload() -> None:
    sweep = with_(
        seed_sweep(),
        algorithms=("PSO",),
        iterations=Range(2**31 - 2, 2**31 - 1, 1),
        agents=Range(-(2**31), -(2**31), 2**31 - 1),
        dimension=Range(0, 2**31 - 1, 2**31 - 1),
    )
    sweep.check(max_tasks=4, max_bytes=ROOMY)
    assert sweep.shape == (1, 2, 1, 2)
    assert sweep.params(3) == TaskParams("PSO", 2**31 - 1, -(2**31), 2**31 - 1)
    assert json.loads(sweep.payload(3))["iterations"] == 2**31 - 1


def test_sweep_error_is_a_value_error() -> None:
    assert issubclass(SweepError, ValueError)


# ---- JSON -------------------------------------------------------------------------


def test_sweep_json_round_trips_to_an_equal_sweep() -> None:
    sweep = seed_sweep()
    back = Sweep.from_json(sweep.to_json())
    assert back == sweep
    assert isinstance(back.algorithms, tuple)
    assert back.to_json() == sweep.to_json()


def test_sweep_json_is_canonical_sorted_and_compact() -> None:
    text = seed_sweep().to_json()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data["algorithms"] == ["PSO", "GA", "DE"]
    assert data["iterations"] == {"max": 500, "min": 100, "step": 100}
    assert " " not in text


def test_sweep_json_is_the_text_jobs_were_always_stored_with() -> None:
    """Idempotent retries compare it with the text in jobs stored by older versions."""
    assert with_(seed_sweep(), algorithms=("PSO", "é")).to_json() == (
        '{"agents":{"max":50,"min":10,"step":10},"algorithms":["PSO","\\u00e9"],'
        '"dimension":{"max":10,"min":2,"step":2},"iterations":{"max":500,"min":100,"step":100},'
        '"jar_path":"/path/to/optimizer.jar","main_class":"com.example.OptRunner"}'
    )


def test_different_sweeps_have_different_json() -> None:
    assert seed_sweep().to_json() != with_(seed_sweep(), main_class="Other").to_json()
    reordered = with_(seed_sweep(), algorithms=("GA", "PSO", "DE"))
    assert seed_sweep().to_json() != reordered.to_json()


# ---- ids --------------------------------------------------------------------------


def test_job_and_spot_ids_round_trip() -> None:
    uuid = uuid4()
    assert job_id(uuid) == "job-" + uuid.hex
    assert parse_job_id(job_id(uuid)) == uuid
    assert spot_id(uuid) == "spot-" + uuid.hex
    assert parse_spot_id(spot_id(uuid)) == uuid


def test_task_ids_round_trip_to_their_job_and_index() -> None:
    job = uuid4()
    text = task_id(job, 374)
    assert text == f"task-{job.hex}-374"
    ref = parse_task_id(text)
    assert (ref.job, ref.index) == (job, 374)
    assert ref.id == text


HEX = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "job-",
        f"job-{HEX}0",
        f"job-{HEX[:-1]}",
        f"job-{HEX.upper()}",
        f"spot-{HEX}",
        f"JOB-{HEX}",
        f" job-{HEX}",
        "job-" + str(UUID(HEX)),
    ],
)
def test_garbled_job_ids_are_unknown(text: str) -> None:
    with pytest.raises(UnknownIdError):
        parse_job_id(text)


@pytest.mark.parametrize("text", ["", f"job-{HEX}", f"spot-{HEX}x", "spot-abc123"])
def test_garbled_spot_ids_are_unknown(text: str) -> None:
    with pytest.raises(UnknownIdError):
        parse_spot_id(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "task-001",
        f"task-{HEX}",
        f"task-{HEX}-",
        f"task-{HEX}-01",
        f"task-{HEX}--1",
        f"task-{HEX}-1x",
        f"task-{HEX}-1234567890",
        f"task-{HEX.upper()}-1",
        f"job-{HEX}-1",
    ],
)
def test_garbled_task_ids_are_unknown(text: str) -> None:
    with pytest.raises(UnknownIdError):
        parse_task_id(text)


def test_unknown_id_error_is_a_lookup_error() -> None:
    assert issubclass(UnknownIdError, LookupError)


def test_idempotency_keys_name_a_fixed_job_each() -> None:
    assert job_for_key("k-1") == job_for_key("k-1")
    assert job_for_key("k-1") != job_for_key("k-2")


def test_block_ids_are_derived_from_job_and_number() -> None:
    job = uuid4()
    assert block_id(job, 0) == block_id(job, 0)
    assert len({block_id(job, 0), block_id(job, 1), block_id(uuid4(), 0)}) == 3
