"""CommandProcessor: batches of commands decided in memory and stored in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

from domain.family import ConflictError, NotFoundError, Ok, Reaped
from domain.ids import (
    block_id,
    job_id,
    parse_job_id,
    parse_spot_id,
    parse_task_id,
    spot_id,
    task_id,
)
from domain.jobs import (
    BLOCK_SIZE,
    CompleteTask,
    CreateJob,
    FailTask,
    Finished,
    JobCreated,
    OpenJobs,
    ReapTasks,
    ReleaseClaims,
)
from domain.jobs.sweeps import Range, Sweep
from domain.jobs.tasks import DONE, FAILED, NEW, RUNNING, Outcome, TaskBlock
from domain.processor import CommandProcessor
from domain.spots import (
    DOWN,
    UP,
    ClaimedTask,
    ClaimTasks,
    Heartbeat,
    Hello,
    LiveSpots,
    ReapSpots,
    Spot,
    SpotRegistered,
)
from eventstore.store import StorePort, TadpoleStore, memory_env

T0 = datetime(2026, 1, 28, 16, 0, tzinfo=UTC)
MAX_ATTEMPTS = 3
HEARTBEAT_STORE_INTERVAL = 30.0


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sweep(tasks: int, main_class: str = "com.test.Main") -> Sweep:
    """A sweep of ``tasks`` tasks (one algorithm, one value but the dimension)."""
    return Sweep(
        "/test/opt.jar",
        main_class,
        ("PSO",),
        Range(100, 100, 100),
        Range(10, 10, 10),
        Range(1, tasks, 1),
    )


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


@dataclass
class World:
    store: TadpoleStore = field(default_factory=lambda: TadpoleStore(memory_env()))
    port: FlakyPort = field(init=False)
    processor: CommandProcessor = field(init=False)

    def __post_init__(self) -> None:
        self.port = FlakyPort(self.store)
        self.processor = self.restart()

    def restart(self) -> CommandProcessor:
        self.processor = CommandProcessor(self.port, MAX_ATTEMPTS, HEARTBEAT_STORE_INTERVAL)
        return self.processor

    def run(self, *commands: Any, now: datetime = T0) -> list[Any]:
        return self.processor.process(list(commands), now)

    def one(self, command: Any, now: datetime = T0) -> Any:
        (result,) = self.run(command, now=now)
        return result

    def job(self, tasks: int, key: str | None = None, now: datetime = T0) -> str:
        result = self.one(CreateJob(sweep(tasks), key), now)
        assert isinstance(result, JobCreated)
        return result.job_id

    def spot(self, now: datetime = T0) -> str:
        result = self.one(Hello("10.0.0.1"), now)
        assert isinstance(result, SpotRegistered)
        return result.spot_id

    def claim(self, spot: str, n: int, now: datetime = T0) -> list[ClaimedTask]:
        result = self.one(ClaimTasks(spot, n), now)
        assert not isinstance(result, Exception), result
        return result.tasks

    def complete(self, task: str, spot: str, fence: int | None, now: datetime = T0) -> Any:
        return self.one(CompleteTask(task, spot, fence, 1500, 100, 0.001, '{"done":true}'), now)

    def fail(
        self, task: str, spot: str, fence: int | None, retriable: bool = True, now: datetime = T0
    ) -> Any:
        return self.one(FailTask(task, spot, fence, "OutOfMemoryError", retriable), now)

    def position(self) -> int:
        return self.store.max_position()

    def topics(self, after: int = 0) -> list[str]:
        return [n.topic.split(":")[1] for n in self.store.notifications(after, 10_000)]

    def stored_task(self, text: str) -> Any:
        ref = parse_task_id(text)
        block = self.store.load(block_id(ref.job, ref.index // BLOCK_SIZE))
        assert isinstance(block, TaskBlock)
        return block.view(ref.index)

    def stored_spot(self, text: str) -> Spot:
        spot = self.store.load(parse_spot_id(text))
        assert isinstance(spot, Spot)
        return spot


@pytest.fixture
def world() -> World:
    return World()


# ---- creating jobs ---------------------------------------------------------------------


def test_create_job_stores_the_job_and_one_block_per_block_size(world: World) -> None:
    result = world.one(CreateJob(sweep(BLOCK_SIZE + 1)))
    assert isinstance(result, JobCreated)
    assert (result.total_tasks, result.replayed) == (BLOCK_SIZE + 1, False)
    parse_job_id(result.job_id)
    assert world.topics() == ["Job.Created", "TaskBlock.Created", "TaskBlock.Created"]


def test_create_job_with_the_same_idempotency_key_replays_without_storing(world: World) -> None:
    first = world.one(CreateJob(sweep(5), "key-1"))
    position = world.position()
    again = world.one(CreateJob(sweep(5), "key-1"), at(60))
    assert again == JobCreated(first.job_id, 5, replayed=True)
    assert world.position() == position


def test_create_job_replays_within_one_batch_and_after_a_restart(world: World) -> None:
    first, second = world.run(CreateJob(sweep(5), "key-1"), CreateJob(sweep(5), "key-1"))
    assert first.replayed is False
    assert second == JobCreated(first.job_id, 5, replayed=True)
    assert world.topics() == ["Job.Created", "TaskBlock.Created"]
    world.restart()
    position = world.position()
    assert world.one(CreateJob(sweep(5), "key-1")) == JobCreated(first.job_id, 5, replayed=True)
    assert world.position() == position


def test_same_idempotency_key_with_another_sweep_is_a_conflict(world: World) -> None:
    world.one(CreateJob(sweep(5), "key-1"))
    position = world.position()
    result = world.one(CreateJob(sweep(5, main_class="com.test.Other"), "key-1"))
    assert isinstance(result, ConflictError)
    assert world.position() == position


def test_jobs_without_a_key_are_always_new(world: World) -> None:
    a, b = world.run(CreateJob(sweep(2)), CreateJob(sweep(2)))
    assert a.job_id != b.job_id
    assert (a.replayed, b.replayed) == (False, False)


def test_the_sweep_is_stored_once_and_each_block_names_its_job(world: World) -> None:
    job = world.job(3 * BLOCK_SIZE)
    stored = world.store.notifications(0, 100)
    assert [n.topic.split(":")[1] for n in stored] == ["Job.Created"] + ["TaskBlock.Created"] * 3
    assert [n for n in stored if b"/test/opt.jar" in n.state] == stored[:1]
    for number in range(3):
        (created,) = world.store.stored_events(block_id(parse_job_id(job), number))
        assert isinstance(created, TaskBlock.Created)
        assert created.job_id == job
        assert not hasattr(created, "sweep")


# ---- claiming ----------------------------------------------------------------------------


def test_claim_hands_out_tasks_with_their_payload_and_first_fence(world: World) -> None:
    job = world.job(3)
    spot = world.spot()
    tasks = world.claim(spot, 5)
    job_uuid = parse_job_id(job)
    assert [t.task_id for t in tasks] == [task_id(job_uuid, i) for i in range(3)]
    assert [t.payload for t in tasks] == [sweep(3).payload(i) for i in range(3)]
    assert [t.fence for t in tasks] == [1, 1, 1]
    for t in tasks:
        stored = world.stored_task(t.task_id)
        assert (stored.status, stored.holder, stored.fence) == (RUNNING, spot, 1)


def test_claim_payloads_are_the_compact_json_spots_have_always_received(world: World) -> None:
    world.job(3)
    (task,) = world.claim(world.spot(), 1)
    assert task.payload == (
        '{"alg":"PSO","iterations":100,"agents":10,"dimension":1,'
        '"jarPath":"/test/opt.jar","mainClass":"com.test.Main"}'
    )


def test_claims_in_the_batch_that_creates_the_job_get_its_payloads(world: World) -> None:
    spot = world.spot()
    created, claimed = world.run(CreateJob(sweep(4)), ClaimTasks(spot, 2))
    assert [t.payload for t in claimed.tasks] == [sweep(4).payload(i) for i in range(2)]
    assert [t.task_id for t in claimed.tasks] == [
        task_id(parse_job_id(created.job_id), i) for i in range(2)
    ]


def test_claims_after_a_restart_get_payloads_from_the_stored_job(world: World) -> None:
    world.job(BLOCK_SIZE + 2, key="key-1")
    world.one(CreateJob(sweep(3, main_class="com.test.Other")))
    spot = world.spot()
    world.claim(spot, BLOCK_SIZE)
    world.restart()
    tasks = world.claim(spot, 4)
    expected = [sweep(BLOCK_SIZE + 2).payload(i) for i in (BLOCK_SIZE, BLOCK_SIZE + 1)]
    expected += [sweep(3, main_class="com.test.Other").payload(i) for i in (0, 1)]
    assert [t.payload for t in tasks] == expected


def test_claims_in_one_batch_never_hand_out_a_task_twice(world: World) -> None:
    world.job(10)
    spots = [world.spot() for _ in range(3)]
    results = world.run(*(ClaimTasks(s, 4) for s in spots))
    handed = [[t.task_id for t in r.tasks] for r in results]
    assert [len(h) for h in handed] == [4, 4, 2]
    flat = [t for h in handed for t in h]
    assert len(set(flat)) == 10
    for spot, ids in zip(spots, handed, strict=True):
        assert all(world.stored_task(t).holder == spot for t in ids)
    assert world.one(ClaimTasks(spots[0], 4)) == type(results[0])([])


def test_claims_across_blocks_in_one_batch_never_hand_out_a_task_twice(world: World) -> None:
    total = BLOCK_SIZE + 100
    job = parse_job_id(world.job(total))
    spots = [world.spot() for _ in range(7)]
    position = world.position()
    results = world.run(*(ClaimTasks(s, 100) for s in spots))
    counts = [len(r.tasks) for r in results]
    flat = [t.task_id for r in results for t in r.tasks]
    assert sum(counts) == total
    assert counts[-1] == 0
    assert sorted(flat) == sorted(task_id(job, i) for i in range(total))
    # One Claimed event per block, whatever the number of commands.
    assert world.topics(position) == ["TaskBlock.Claimed", "TaskBlock.Claimed"]


def test_claims_over_two_batches_continue_where_the_first_stopped(world: World) -> None:
    job = parse_job_id(world.job(BLOCK_SIZE + 2))
    spot = world.spot()
    first = world.claim(spot, BLOCK_SIZE - 1)
    second = world.claim(spot, 3)
    assert [t.task_id for t in second] == [
        task_id(job, i) for i in (BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1)
    ]
    assert not {t.task_id for t in first} & {t.task_id for t in second}


def test_fences_grow_by_one_per_claim_of_the_same_task(world: World) -> None:
    world.job(1)
    spot = world.spot()
    fences = []
    for n in range(MAX_ATTEMPTS):
        (task,) = world.claim(spot, 1, at(n))
        fences.append(task.fence)
        world.fail(task.task_id, spot, task.fence, now=at(n))
    assert fences == [1, 2, 3]


def test_release_claims_frees_only_tasks_held_as_the_lost_claim_left_them(world: World) -> None:
    world.job(4)
    spot, other = world.spot(), world.spot()
    lost = world.claim(spot, 2)
    kept = world.claim(other, 1)
    done = world.claim(spot, 1)
    assert world.complete(done[0].task_id, spot, done[0].fence).outcome is Outcome.ACCEPTED
    claims = (
        *((t.task_id, spot, t.fence) for t in lost),
        (kept[0].task_id, spot, kept[0].fence),  # another spot holds it
        (done[0].task_id, spot, done[0].fence),  # finished since
        (lost[0].task_id, spot, lost[0].fence + 1),  # a later claim's fence: not this one
    )

    result = world.one(ReleaseClaims(claims))

    assert isinstance(result, Reaped)
    assert sorted(result.tasks) == sorted(t.task_id for t in lost)
    assert [world.stored_task(t.task_id).status for t in lost] == ["NEW", "NEW"]
    assert world.stored_task(kept[0].task_id).status == "RUNNING"
    assert world.stored_task(done[0].task_id).status == "DONE"
    assert world.topics()[-1] == "TaskBlock.Reaped"
    again = world.one(ReleaseClaims(claims))  # idempotent: nothing is held like that now
    assert isinstance(again, Reaped) and again.tasks == []


def test_claim_by_an_unknown_spot_is_not_found(world: World) -> None:
    world.job(1)
    position = world.position()
    assert isinstance(world.one(ClaimTasks(spot_id(uuid4()), 1)), NotFoundError)
    assert isinstance(world.one(ClaimTasks("spot-garbled", 1)), NotFoundError)
    assert world.position() == position


# ---- completing and failing ------------------------------------------------------------------


def test_completing_twice_is_accepted_then_already_completed(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    assert world.complete(task.task_id, spot, task.fence) == Finished(Outcome.ACCEPTED)
    position = world.position()
    assert world.topics()[-1] == "TaskBlock.Completed"
    assert world.complete(task.task_id, spot, task.fence) == Finished(Outcome.ALREADY_COMPLETED)
    assert world.position() == position
    assert world.stored_task(task.task_id).status == DONE


def test_completing_twice_in_one_batch_stores_one_completion(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    position = world.position()
    command = CompleteTask(task.task_id, spot, task.fence, 1, 1, 0.0, None)
    assert world.run(command, command) == [
        Finished(Outcome.ACCEPTED),
        Finished(Outcome.ALREADY_COMPLETED),
    ]
    assert world.topics(position) == ["TaskBlock.Completed"]


def test_complete_by_another_spot_is_not_assigned(world: World) -> None:
    world.job(1)
    holder, other = world.spot(), world.spot()
    (task,) = world.claim(holder, 1)
    position = world.position()
    assert world.complete(task.task_id, other, task.fence) == Finished(Outcome.NOT_ASSIGNED)
    assert world.fail(task.task_id, other, task.fence) == Finished(Outcome.NOT_ASSIGNED)
    assert world.position() == position
    assert world.stored_task(task.task_id).holder == holder


def test_complete_of_a_never_claimed_task_is_not_assigned(world: World) -> None:
    job = parse_job_id(world.job(1))
    spot = world.spot()
    assert world.complete(task_id(job, 0), spot, None) == Finished(Outcome.NOT_ASSIGNED)


def test_stale_fencing_token_is_refused(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (old,) = world.claim(spot, 1)
    world.fail(old.task_id, spot, old.fence)
    (new,) = world.claim(spot, 1)
    assert new.fence == old.fence + 1
    position = world.position()
    assert world.complete(old.task_id, spot, old.fence) == Finished(Outcome.STALE_FENCE)
    assert world.fail(old.task_id, spot, old.fence) == Finished(Outcome.STALE_FENCE)
    assert world.position() == position
    assert world.complete(new.task_id, spot, new.fence) == Finished(Outcome.ACCEPTED)


@pytest.mark.parametrize(
    "text",
    [
        "task-001",
        "garbage",
        task_id(uuid4(), 0),
        job_id(uuid4()),
    ],
)
def test_complete_or_fail_of_an_unknown_task_is_not_found(world: World, text: str) -> None:
    world.job(1)
    spot = world.spot()
    assert isinstance(world.complete(text, spot, None), NotFoundError)
    assert isinstance(world.fail(text, spot, None), NotFoundError)


def test_a_task_index_beyond_the_job_is_not_found(world: World) -> None:
    job = parse_job_id(world.job(3))
    spot = world.spot()
    world.claim(spot, 3)
    position = world.position()
    for index in (3, BLOCK_SIZE, BLOCK_SIZE + 5):
        assert isinstance(world.complete(task_id(job, index), spot, 1), NotFoundError)
        assert isinstance(world.fail(task_id(job, index), spot, 1), NotFoundError)
    assert world.position() == position


def test_third_claim_and_fail_of_a_task_ends_failed(world: World) -> None:
    world.job(1)
    spot = world.spot()
    answers = []
    for n in range(3):
        (task,) = world.claim(spot, 1, at(n))
        answers.append(world.fail(task.task_id, spot, task.fence, now=at(n)))
    assert answers == [
        Finished(Outcome.ACCEPTED, will_retry=True),
        Finished(Outcome.ACCEPTED, will_retry=True),
        Finished(Outcome.ACCEPTED, will_retry=False),
    ]
    stored = world.stored_task(task.task_id)
    assert (stored.status, stored.attempts) == (FAILED, 3)
    assert world.claim(spot, 1) == []
    position = world.position()
    assert world.complete(task.task_id, spot, task.fence) == Finished(Outcome.ALREADY_TERMINAL)
    assert world.fail(task.task_id, spot, task.fence) == Finished(Outcome.ALREADY_TERMINAL)
    assert world.position() == position


def test_a_non_retriable_failure_is_final_at_once(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    assert world.fail(task.task_id, spot, task.fence, retriable=False) == Finished(
        Outcome.ACCEPTED, will_retry=False
    )
    assert world.stored_task(task.task_id).status == FAILED
    assert world.claim(spot, 1) == []


def test_a_retried_task_can_be_claimed_again_in_the_same_batch(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    fail, claim = world.run(
        FailTask(task.task_id, spot, task.fence, "x", True), ClaimTasks(spot, 1)
    )
    assert fail == Finished(Outcome.ACCEPTED, will_retry=True)
    assert [(t.task_id, t.fence) for t in claim.tasks] == [(task.task_id, 2)]


# ---- spots and the SpotReaper -------------------------------------------------------------------


def test_spot_reaper_marks_a_silent_spot_down_and_frees_its_tasks(world: World) -> None:
    world.job(2)
    silent = world.spot()
    alive = world.spot()
    (task,) = world.claim(silent, 1)
    world.one(Heartbeat(alive), at(8))
    _, reaped = world.run(Heartbeat(alive), ReapSpots(10.0), now=at(11))
    assert reaped == Reaped(spots=[silent], tasks=[task.task_id])
    assert world.stored_spot(silent).status == DOWN
    assert world.stored_spot(alive).status == UP
    stored = world.stored_task(task.task_id)
    assert (stored.status, stored.holder) == (NEW, None)
    (again,) = world.claim(alive, 1, at(12))
    assert (again.task_id, again.fence) == (task.task_id, task.fence + 1)
    assert world.complete(task.task_id, silent, task.fence, at(13)) == Finished(
        Outcome.NOT_ASSIGNED
    )
    assert world.complete(again.task_id, alive, again.fence, at(13)) == Finished(Outcome.ACCEPTED)


def test_spot_reaper_spares_spots_heard_from_within_the_timeout(world: World) -> None:
    world.job(1)
    spot = world.spot()
    world.claim(spot, 1)
    position = world.position()
    world.one(Heartbeat(spot), at(5))
    assert world.one(ReapSpots(10.0), at(15)) == Reaped()
    assert world.one(ReapSpots(10.0), at(10)) == Reaped()
    assert world.position() == position
    assert world.stored_spot(spot).status == UP


def test_a_down_spot_cannot_claim(world: World) -> None:
    world.job(1)
    spot = world.spot()
    world.one(ReapSpots(10.0), at(11))
    assert isinstance(world.one(ClaimTasks(spot, 1), at(12)), ConflictError)


def test_heartbeat_from_a_down_spot_brings_it_up(world: World) -> None:
    world.job(1)
    spot = world.spot()
    world.one(ReapSpots(10.0), at(11))
    assert world.stored_spot(spot).status == DOWN
    position = world.position()
    assert world.one(Heartbeat(spot, cpu_load=12.5), at(20)) == Ok()
    assert world.topics(position) == ["Spot.CameUp", "Spot.HeartbeatRecorded"]
    stored = world.stored_spot(spot)
    assert (stored.status, stored.cpu_load, stored.last_heartbeat) == (UP, 12.5, at(20))
    (task,) = world.claim(spot, 1, at(21))
    assert task.fence == 1


def test_heartbeat_from_an_unknown_spot_is_not_found(world: World) -> None:
    assert isinstance(world.one(Heartbeat(spot_id(uuid4()))), NotFoundError)
    assert isinstance(world.one(Heartbeat("nonsense")), NotFoundError)


def test_heartbeats_are_stored_when_figures_change_or_the_interval_passed(world: World) -> None:
    spot = world.spot()
    position = world.position()
    world.one(Heartbeat(spot, "10.0.0.1", 0.0, 0, 0), at(1))
    assert world.position() == position
    world.one(Heartbeat(spot, "10.0.0.1", 50.0, 2, 8), at(2))
    assert world.topics(position) == ["Spot.HeartbeatRecorded"]
    assert world.stored_spot(spot).figures() == ("10.0.0.1", 50.0, 2, 8)
    world.one(Heartbeat(spot), at(2 + HEARTBEAT_STORE_INTERVAL))
    assert world.topics(position) == ["Spot.HeartbeatRecorded"] * 2
    assert world.stored_spot(spot).figures() == ("10.0.0.1", 50.0, 2, 8)


# ---- the TaskReaper -------------------------------------------------------------------


def test_task_reaper_reaps_tasks_whose_holder_was_silent_past_the_threshold(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    world.one(Heartbeat(spot), at(200))
    assert world.one(ReapTasks(300.0), at(500)) == Reaped()
    assert world.stored_task(task.task_id).status == RUNNING
    assert world.one(ReapTasks(300.0), at(501)) == Reaped(tasks=[task.task_id])
    stored = world.stored_task(task.task_id)
    assert (stored.status, stored.holder, stored.attempts) == (NEW, None, 1)
    assert world.topics()[-1] == "TaskBlock.Reaped"


def test_task_reaper_counts_from_the_claim_when_it_is_later_than_the_heartbeat(
    world: World,
) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1, at(100))
    assert world.one(ReapTasks(300.0), at(400)) == Reaped()
    assert world.one(ReapTasks(300.0), at(401)) == Reaped(tasks=[task.task_id])


def test_task_reaper_spares_a_holder_that_heartbeats_in_the_same_batch(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    _, reaped = world.run(Heartbeat(spot), ReapTasks(300.0), now=at(400))
    assert reaped == Reaped()
    assert world.stored_task(task.task_id).holder == spot


def test_a_reap_counts_as_a_failed_attempt(world: World) -> None:
    world.job(1)
    spot = world.spot()
    for n in range(MAX_ATTEMPTS):
        claimed_at = at(1000 * n)
        (task,) = world.claim(spot, 1, claimed_at)
        world.one(Heartbeat(spot), claimed_at)
        reaped = world.one(ReapTasks(300.0), claimed_at + timedelta(seconds=301))
        assert reaped == Reaped(tasks=[task.task_id])
    stored = world.stored_task(task.task_id)
    assert (stored.status, stored.attempts) == (FAILED, MAX_ATTEMPTS)
    assert world.claim(spot, 1, at(5000)) == []


# ---- store failures and restarts ------------------------------------------------------


def assert_processor_matches_store(world: World, job: str, tasks: int) -> None:
    processor = world.processor
    uuid = parse_job_id(job)
    for index in range(tasks):
        number = index // BLOCK_SIZE
        stored = world.store.load(block_id(uuid, number))
        assert isinstance(stored, TaskBlock)
        held = processor.state(OpenJobs).blocks.get(stored.id)
        if held is not None:
            assert held.version == stored.version
            assert held.view(index) == stored.view(index)
    for uuid_, spot in processor.state(LiveSpots).spots.items():
        stored_spot = world.store.load(uuid_)
        assert isinstance(stored_spot, Spot)
        assert (spot.version, spot.status) == (stored_spot.version, stored_spot.status)


def test_a_store_failure_reaches_the_callers_and_stores_nothing(world: World) -> None:
    job = world.job(3)
    spot = world.spot()
    (held,) = world.claim(spot, 1)
    position = world.position()
    world.port.armed = True
    with pytest.raises(ConnectionError):
        world.run(
            CompleteTask(held.task_id, spot, held.fence, 1, 1, 0.0, None),
            ClaimTasks(spot, 2),
            CreateJob(sweep(2), "key-lost"),
            Hello("10.0.0.9"),
        )
    assert world.position() == position
    assert world.stored_task(held.task_id).status == RUNNING
    # The next batch sees the store, not the refused batch.
    complete, claim, create = world.run(
        CompleteTask(held.task_id, spot, held.fence, 1, 1, 0.0, None),
        ClaimTasks(spot, 5),
        CreateJob(sweep(2), "key-lost"),
        now=at(1),
    )
    assert complete == Finished(Outcome.ACCEPTED)
    job_uuid = parse_job_id(job)
    lost_uuid = parse_job_id(create.job_id)
    expected = [(job_uuid, 1), (job_uuid, 2), (lost_uuid, 0), (lost_uuid, 1)]
    assert sorted((t.task_id, t.fence) for t in claim.tasks) == sorted(
        (task_id(u, i), 1) for u, i in expected
    )
    assert create.replayed is False
    assert_processor_matches_store(world, job, 3)


def test_after_a_store_failure_the_processor_state_equals_the_store(world: World) -> None:
    job = world.job(4)
    spot = world.spot()
    tasks = world.claim(spot, 2)
    world.port.armed = True
    with pytest.raises(ConnectionError):
        world.run(
            FailTask(tasks[0].task_id, spot, tasks[0].fence, "x", True),
            ReapSpots(1.0),
            now=at(100),
        )
    assert world.stored_spot(spot).status == UP
    assert world.one(Heartbeat(spot), at(100)) == Ok()
    assert_processor_matches_store(world, job, 4)
    assert world.processor.state(LiveSpots).spots[parse_spot_id(spot)].status == UP
    view = world.processor.state(OpenJobs).blocks[block_id(parse_job_id(job), 0)].view(0)
    assert (view.status, view.holder, view.fence) == (RUNNING, spot, 1)


def test_a_restarted_processor_continues_where_the_old_one_left_off(world: World) -> None:
    job = world.job(4, key="key-1")
    holder = world.spot()
    held = world.claim(holder, 2)
    world.restart()
    other = world.spot(at(1))
    position = world.position()
    assert world.one(CreateJob(sweep(4), "key-1"), at(1)).replayed is True
    assert world.position() == position
    claimed = world.claim(other, 5, at(1))
    assert [t.task_id for t in claimed] == [task_id(parse_job_id(job), i) for i in (2, 3)]
    assert [t.fence for t in claimed] == [1, 1]
    assert world.complete(held[0].task_id, other, held[0].fence, at(2)) == Finished(
        Outcome.NOT_ASSIGNED
    )
    assert world.complete(held[0].task_id, holder, held[0].fence, at(2)) == Finished(
        Outcome.ACCEPTED
    )
    assert world.fail(held[1].task_id, holder, held[1].fence, now=at(2)) == Finished(
        Outcome.ACCEPTED, will_retry=True
    )
    (retry,) = world.claim(other, 5, at(3))
    assert (retry.task_id, retry.fence) == (held[1].task_id, 2)


def test_a_restarted_processor_still_reaps_silent_spots(world: World) -> None:
    world.job(1)
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    world.restart()
    # A restart gives every known spot a full timeout from the restart.
    assert world.one(ReapSpots(10.0), at(100)) == Reaped()
    assert world.one(ReapSpots(10.0), at(111)) == Reaped(spots=[spot], tasks=[task.task_id])


def test_finished_blocks_leave_memory_and_answer_from_the_store(world: World) -> None:
    job = parse_job_id(world.job(1))
    spot = world.spot()
    (task,) = world.claim(spot, 1)
    world.complete(task.task_id, spot, task.fence)
    assert block_id(job, 0) not in world.processor.state(OpenJobs).blocks
    assert world.complete(task.task_id, spot, task.fence) == Finished(Outcome.ALREADY_COMPLETED)
    world.restart()
    assert world.complete(task.task_id, spot, task.fence) == Finished(Outcome.ALREADY_COMPLETED)


def test_commands_without_an_answer_of_their_own_answer_ok(world: World) -> None:
    spot = world.spot()
    assert world.one(Heartbeat(spot)) == Ok()


# ---- cost independent of history --------------------------------------------------------


class CountingPort(FlakyPort):
    """Counts the aggregates loaded from the store; can play a store that has no index."""

    def __init__(self, store: TadpoleStore):
        super().__init__(store)
        self.loaded: list[Any] = []
        self.no_index = False
        self.built: dict[Any, str] | None = None

    def load(self, uuid: Any) -> Any:
        self.loaded.append(uuid)
        return super().load(uuid)

    def open_aggregates(self) -> dict[Any, str] | None:
        return None if self.no_index else super().open_aggregates()

    def build_open_index(self, opened: Any) -> None:
        self.built = dict(opened)
        self.no_index = False
        super().build_open_index(opened)


def finished_history(world: World, jobs: int) -> tuple[str, str, str]:
    """``jobs`` finished one-task jobs, one open job, a spot UP and a spot DOWN."""
    down = world.spot()
    spot = world.spot()
    for _ in range(jobs):
        world.job(1)
        (task,) = world.claim(spot, 1)
        assert world.complete(task.task_id, spot, task.fence) == Finished(Outcome.ACCEPTED)
    open_job = world.job(3)
    world.one(Heartbeat(spot), now=at(20))
    world.one(ReapSpots(10.0), now=at(20))  # the silent one goes DOWN
    return open_job, spot, down


def test_start_up_loads_the_open_work_only_not_history() -> None:
    world = World()
    world.port = port = CountingPort(world.store)
    world.restart()
    open_job, spot, down = finished_history(world, 40)
    assert world.store.open_aggregates() == {
        block_id(parse_job_id(open_job), 0): "TaskBlock",
        parse_spot_id(spot): "Spot",
    }
    port.loaded.clear()
    processor = world.restart()
    processor.recover(at(21))
    # The open block, its job and the live spot: not the 40 finished jobs and blocks.
    assert sorted(map(str, port.loaded)) == sorted(
        map(str, [block_id(parse_job_id(open_job), 0), parse_job_id(open_job), parse_spot_id(spot)])
    )
    assert list(processor.state(LiveSpots).spots) == [parse_spot_id(spot)]
    # ...and it works on as before: the open job's tasks are claimed, a DOWN spot comes back.
    claimed = world.claim(spot, 5, now=at(21))
    assert {parse_task_id(t.task_id).job for t in claimed} == {parse_job_id(open_job)}
    assert world.one(Heartbeat(down), now=at(21)) == Ok()
    assert world.stored_spot(down).status == UP


def test_finished_work_leaves_memory_and_late_reports_load_it_on_demand() -> None:
    world = World()
    spot = world.spot()
    tasks = []
    for _ in range(3):
        world.job(1)
        (task,) = world.claim(spot, 1)
        world.complete(task.task_id, spot, task.fence)
        tasks.append(task)
    jobs = world.processor.state(OpenJobs)
    assert jobs.jobs == {} and jobs.blocks == {}
    # A duplicate report on a finished task is answered as before.
    first = tasks[0]
    assert world.complete(first.task_id, spot, first.fence) == Finished(Outcome.ALREADY_COMPLETED)


def test_memory_of_closed_work_is_bounded() -> None:
    world = World()
    jobs = world.processor.state(OpenJobs)
    jobs.recent_jobs.size = jobs.recent_blocks.size = 10
    spot = world.spot()
    for _ in range(30):
        world.job(1)
        (task,) = world.claim(spot, 1)
        world.complete(task.task_id, spot, task.fence)
    assert len(jobs.recent_jobs) == len(jobs.recent_blocks) == 10
    assert jobs.jobs == {} and jobs.blocks == {}


def test_a_store_written_before_the_index_gets_it_built_once() -> None:
    world = World()
    world.port = port = CountingPort(world.store)
    world.restart()
    finished_history(world, 5)
    expected = world.store.open_aggregates()
    port.no_index = True
    world.restart().recover(at(21))
    assert port.built == expected  # found by loading every block and spot once
    port.loaded.clear()
    world.restart().recover(at(22))
    assert len(port.loaded) == 3  # from then on, from the index
