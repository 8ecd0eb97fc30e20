"""TaskBlock and BlockBatch: the per-task rules a block enforces and the events it stores."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest

from domain.ids import job_id
from domain.jobs.tasks import (
    DONE,
    FAILED,
    NEW,
    RUNNING,
    BlockBatch,
    Completion,
    Failure,
    Outcome,
    Reap,
    TaskBlock,
    TaskBlockError,
)
from schemas.codec import Codec, message_from_event

T0 = datetime(2026, 1, 28, 16, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def make_block(first: int = 0, count: int = 10, max_attempts: int = 3) -> TaskBlock:
    block = TaskBlock.create(uuid4(), job_id(uuid4()), first, count, max_attempts)
    block.collect_events()
    return block


def events(block: TaskBlock) -> list[object]:
    """The events the block triggered since the last call."""
    return list(block.collect_events())


def completion(index: int, holder: str, result: str | None = '{"ok":true}') -> Completion:
    return Completion(index, holder, runtime_ms=1500, iter=100, fopt=0.5, result_json=result)


def claimed(block: TaskBlock, index: int, holder: str, when: datetime = T0) -> int:
    """Claims one task, drops the event, returns its fencing token."""
    block.claim([index], [holder], when)
    block.collect_events()
    return block.view(index).fence


def fail_once(block: TaskBlock, index: int, holder: str, retriable: bool) -> tuple[Outcome, bool]:
    batch = BlockBatch(block)
    answer = batch.fail(index, holder, block.view(index).fence, "OutOfMemoryError", retriable)
    batch.record(T0)
    block.collect_events()
    return answer


# ---- creation -----------------------------------------------------------------------


def test_a_new_block_has_only_new_tasks() -> None:
    block = make_block(first=500, count=3)
    assert block.new_count() == 3
    assert [block.view(i).status for i in (500, 501, 502)] == [NEW, NEW, NEW]
    assert block.view(500).fence == 0
    assert block.view(500).attempts == 0
    assert not block.is_finished()


@pytest.mark.parametrize(("first", "count", "max_attempts"), [(0, 0, 3), (-1, 5, 3), (0, 5, 0)])
def test_a_block_without_tasks_or_attempts_cannot_be_created(
    first: int, count: int, max_attempts: int
) -> None:
    with pytest.raises(TaskBlockError):
        TaskBlock.create(uuid4(), "job-x", first, count, max_attempts)


def test_a_block_created_event_names_its_job_and_carries_no_sweep() -> None:
    block = TaskBlock.create(uuid4(), "job-abc", 500, 10, 3)
    (created,) = events(block)
    assert isinstance(created, TaskBlock.Created)
    assert (created.job_id, created.first, created.count) == ("job-abc", 500, 10)
    assert not hasattr(created, "sweep")


# ---- claims -------------------------------------------------------------------------


def test_claim_makes_tasks_running_under_the_holder_with_the_next_fence() -> None:
    block = make_block()
    block.claim([2, 3], ["spot-a", "spot-b"], at(5))
    (event,) = events(block)
    assert isinstance(event, TaskBlock.Claimed)
    assert (event.indexes, event.holders, event.fences, event.attempts) == (
        [2, 3],
        ["spot-a", "spot-b"],
        [1, 1],
        [1, 1],
    )
    task = block.view(2)
    assert (task.status, task.holder, task.fence, task.attempts) == (RUNNING, "spot-a", 1, 1)
    assert task.claimed_at == at(5).timestamp()
    assert block.view(3).holder == "spot-b"
    assert block.new_count() == 8


def test_a_running_task_cannot_be_claimed_again() -> None:
    block = make_block()
    claimed(block, 0, "spot-a")
    with pytest.raises(TaskBlockError, match="not NEW"):
        block.claim([0], ["spot-b"], T0)
    assert block.view(0).holder == "spot-a"
    assert block.view(0).fence == 1
    assert events(block) == []


def test_a_claim_naming_a_task_twice_is_refused() -> None:
    block = make_block()
    with pytest.raises(TaskBlockError):
        block.claim([1, 1], ["spot-a", "spot-b"], T0)
    assert block.view(1).status == NEW
    assert block.view(1).fence == 0
    assert events(block) == []


def test_a_claim_with_a_holder_count_unlike_its_task_count_is_refused() -> None:
    block = make_block()
    with pytest.raises(TaskBlockError):
        block.claim([1, 2], ["spot-a"], T0)
    assert block.new_count() == 10
    assert events(block) == []


@pytest.mark.parametrize("index", [0, 499, 503, 1000])
def test_a_task_outside_the_block_cannot_be_claimed(index: int) -> None:
    block = make_block(first=500, count=3)
    with pytest.raises(TaskBlockError, match="not in this block"):
        block.claim([index], ["spot-a"], T0)
    assert block.new_count() == 3
    assert events(block) == []


def test_every_claim_gives_a_fence_one_higher_than_the_last() -> None:
    block = make_block(max_attempts=5)
    fences = []
    for _ in range(4):
        fences.append(claimed(block, 0, "spot-a"))
        fail_once(block, 0, "spot-a", retriable=True)
    assert fences == [1, 2, 3, 4]


def test_new_indexes_skips_running_and_picked_tasks_and_honours_the_limit() -> None:
    block = make_block(first=100, count=6)
    claimed(block, 101, "spot-a")
    assert block.new_indexes(10, skip=set()) == [100, 102, 103, 104, 105]
    assert block.new_indexes(2, skip={100}) == [102, 103]
    assert block.new_indexes(10, skip={100, 102, 103, 104, 105}) == []


# ---- direct finishing guards ----------------------------------------------------------


def test_only_the_holder_can_complete_a_running_task() -> None:
    block = make_block()
    claimed(block, 0, "spot-a")
    with pytest.raises(TaskBlockError, match="not RUNNING under spot-b"):
        block.complete([completion(0, "spot-b")], T0)
    assert block.view(0).status == RUNNING
    assert events(block) == []


def test_a_new_task_cannot_be_completed_failed_or_reaped() -> None:
    block = make_block()
    with pytest.raises(TaskBlockError):
        block.complete([completion(0, "spot-a")], T0)
    with pytest.raises(TaskBlockError):
        block.fail([Failure(0, "spot-a", "boom", retried=True)], T0)
    with pytest.raises(TaskBlockError):
        block.reap([Reap(0, "spot-a", retried=True)], "lease expired", T0)
    assert block.view(0).status == NEW
    assert events(block) == []


def test_a_done_task_cannot_be_completed_again() -> None:
    block = make_block()
    claimed(block, 0, "spot-a")
    block.complete([completion(0, "spot-a")], T0)
    events(block)
    with pytest.raises(TaskBlockError):
        block.complete([completion(0, "spot-a")], T0)
    assert events(block) == []


def test_a_change_naming_a_task_twice_is_refused() -> None:
    block = make_block()
    claimed(block, 0, "spot-a")
    with pytest.raises(TaskBlockError, match="twice"):
        block.complete([completion(0, "spot-a"), completion(0, "spot-a")], T0)
    assert block.view(0).status == RUNNING


def test_a_retry_beyond_max_attempts_is_refused() -> None:
    block = make_block(max_attempts=1)
    claimed(block, 0, "spot-a")
    with pytest.raises(TaskBlockError, match="used all its attempts"):
        block.fail([Failure(0, "spot-a", "boom", retried=True)], T0)
    with pytest.raises(TaskBlockError, match="used all its attempts"):
        block.reap([Reap(0, "spot-a", retried=True)], "spot down", T0)
    assert block.view(0).status == RUNNING
    assert events(block) == []


# ---- BlockBatch decisions ----------------------------------------------------------------


def test_the_holder_with_the_current_fence_completes_a_task() -> None:
    block = make_block()
    fence = claimed(block, 0, "spot-a")
    batch = BlockBatch(block)
    assert batch.complete(completion(0, "spot-a"), fence) is Outcome.ACCEPTED
    batch.record(at(9))
    (event,) = events(block)
    assert isinstance(event, TaskBlock.Completed)
    assert (event.indexes, event.holders, event.runtime_ms, event.iters, event.fopts) == (
        [0],
        ["spot-a"],
        [1500],
        [100],
        [0.5],
    )
    assert event.results == ['{"ok":true}']
    assert event.at == at(9)
    task = block.view(0)
    assert (task.status, task.holder, task.claimed_at) == (DONE, None, None)


def test_a_completion_without_a_fence_is_accepted_from_the_holder() -> None:
    block = make_block()
    claimed(block, 0, "spot-a")
    assert BlockBatch(block).complete(completion(0, "spot-a"), None) is Outcome.ACCEPTED


def test_completing_twice_in_one_batch_answers_already_completed() -> None:
    block = make_block()
    fence = claimed(block, 0, "spot-a")
    batch = BlockBatch(block)
    assert batch.complete(completion(0, "spot-a"), fence) is Outcome.ACCEPTED
    assert batch.complete(completion(0, "spot-a"), fence) is Outcome.ALREADY_COMPLETED
    batch.record(T0)
    (event,) = events(block)
    assert event.indexes == [0]


def test_completing_a_done_task_answers_already_completed_and_stores_nothing() -> None:
    block = make_block()
    fence = claimed(block, 0, "spot-a")
    first = BlockBatch(block)
    first.complete(completion(0, "spot-a"), fence)
    first.record(T0)
    events(block)
    again = BlockBatch(block)
    assert again.complete(completion(0, "spot-a"), fence) is Outcome.ALREADY_COMPLETED
    assert again.fail(0, "spot-a", fence, "late", True) == (Outcome.ALREADY_TERMINAL, False)
    again.record(T0)
    assert events(block) == []
    assert block.view(0).status == DONE


def test_completing_or_failing_a_failed_task_answers_already_terminal() -> None:
    block = make_block()
    fence = claimed(block, 0, "spot-a")
    assert fail_once(block, 0, "spot-a", retriable=False) == (Outcome.ACCEPTED, False)
    batch = BlockBatch(block)
    assert batch.complete(completion(0, "spot-a"), fence) is Outcome.ALREADY_TERMINAL
    assert batch.fail(0, "spot-a", fence, "again", True) == (Outcome.ALREADY_TERMINAL, False)
    batch.record(T0)
    assert events(block) == []
    assert block.view(0).status == FAILED


def test_another_spot_is_not_assigned_the_task() -> None:
    block = make_block()
    fence = claimed(block, 0, "spot-a")
    batch = BlockBatch(block)
    assert batch.complete(completion(0, "spot-b"), fence) is Outcome.NOT_ASSIGNED
    assert batch.fail(0, "spot-b", fence, "x", True) == (Outcome.NOT_ASSIGNED, False)
    batch.record(T0)
    assert events(block) == []
    assert block.view(0).holder == "spot-a"


def test_a_never_claimed_task_is_not_assigned_to_anyone() -> None:
    batch = BlockBatch(make_block())
    assert batch.complete(completion(0, "spot-a"), None) is Outcome.NOT_ASSIGNED
    assert batch.fail(0, "spot-a", None, "x", True) == (Outcome.NOT_ASSIGNED, False)


def test_a_reaped_task_is_no_longer_assigned_to_its_old_holder() -> None:
    block = make_block()
    fence = claimed(block, 0, "spot-a")
    reaping = BlockBatch(block)
    assert reaping.reap(0, "spot down") == Reap(0, "spot-a", retried=True)
    reaping.record(T0)
    events(block)
    batch = BlockBatch(block)
    assert batch.complete(completion(0, "spot-a"), fence) is Outcome.NOT_ASSIGNED


def test_stale_fencing_token_is_refused() -> None:
    block = make_block()
    old = claimed(block, 0, "spot-a")
    fail_once(block, 0, "spot-a", retriable=True)
    current = claimed(block, 0, "spot-a")
    assert current == old + 1
    batch = BlockBatch(block)
    assert batch.complete(completion(0, "spot-a"), old) is Outcome.STALE_FENCE
    assert batch.fail(0, "spot-a", old, "x", True) == (Outcome.STALE_FENCE, False)
    assert batch.complete(completion(0, "spot-a"), current + 1) is Outcome.STALE_FENCE
    batch.record(T0)
    assert events(block) == []
    assert block.view(0).status == RUNNING


# ---- retry counting ------------------------------------------------------------------------


def test_third_retriable_failure_is_final() -> None:
    block = make_block(max_attempts=3)
    answers, states = [], []
    for _ in range(3):
        claimed(block, 0, "spot-a")
        answers.append(fail_once(block, 0, "spot-a", retriable=True))
        states.append(block.view(0).status)
    assert answers == [
        (Outcome.ACCEPTED, True),
        (Outcome.ACCEPTED, True),
        (Outcome.ACCEPTED, False),
    ]
    assert states == [NEW, NEW, FAILED]
    assert block.view(0).attempts == 3
    assert block.new_indexes(10, set()) == list(range(1, 10))


def test_a_non_retriable_failure_is_final_at_once() -> None:
    block = make_block(max_attempts=3)
    claimed(block, 0, "spot-a")
    batch = BlockBatch(block)
    assert batch.fail(0, "spot-a", 1, "bad input", retriable=False) == (Outcome.ACCEPTED, False)
    batch.record(T0)
    (event,) = events(block)
    assert isinstance(event, TaskBlock.Failed)
    assert (event.indexes, event.errors, event.retried) == ([0], ["bad input"], [False])
    assert block.view(0).status == FAILED
    assert block.view(0).attempts == 1


def test_a_reap_counts_as_a_failed_attempt() -> None:
    block = make_block(max_attempts=3)
    claimed(block, 0, "spot-a")
    fail_once(block, 0, "spot-a", retriable=True)
    claimed(block, 0, "spot-b")
    first = BlockBatch(block)
    assert first.reap(0, "lease expired") == Reap(0, "spot-b", retried=True)
    first.record(T0)
    events(block)
    assert block.view(0).status == NEW
    claimed(block, 0, "spot-c")
    last = BlockBatch(block)
    assert last.reap(0, "lease expired") == Reap(0, "spot-c", retried=False)
    last.record(T0)
    (event,) = events(block)
    assert isinstance(event, TaskBlock.Reaped)
    assert (event.indexes, event.holders, event.retried, event.reason) == (
        [0],
        ["spot-c"],
        [False],
        "lease expired",
    )
    assert block.view(0).status == FAILED


def test_reaping_a_task_that_is_not_running_does_nothing() -> None:
    block = make_block()
    fence = claimed(block, 1, "spot-a")
    batch = BlockBatch(block)
    assert batch.reap(0, "spot down") is None
    assert batch.complete(completion(1, "spot-a"), fence) is Outcome.ACCEPTED
    assert batch.reap(1, "spot down") is None
    batch.record(T0)
    (event,) = events(block)
    assert isinstance(event, TaskBlock.Completed)


def test_a_task_retried_in_a_batch_is_new_again_for_claims() -> None:
    block = make_block(count=2)
    claimed(block, 0, "spot-a")
    claimed(block, 1, "spot-a")
    fail_once(block, 0, "spot-a", retriable=True)
    assert block.new_indexes(5, set()) == [0]
    assert block.view(0).holder is None


def test_a_block_is_finished_when_every_task_is_done_or_failed() -> None:
    block = make_block(count=2)
    f0 = claimed(block, 0, "spot-a")
    claimed(block, 1, "spot-a")
    batch = BlockBatch(block)
    batch.complete(completion(0, "spot-a"), f0)
    assert not block.is_finished()
    batch.fail(1, "spot-a", None, "x", retriable=False)
    batch.record(T0)
    assert block.is_finished()


# ---- one event per kind ---------------------------------------------------------------------


def test_record_stores_one_event_per_kind_of_change() -> None:
    block = make_block(count=10)
    block.claim(list(range(8)), ["spot-a"] * 6 + ["spot-b"] * 2, T0)
    events(block)
    batch = BlockBatch(block)
    for i in (0, 1, 2):
        assert batch.complete(completion(i, "spot-a"), 1) is Outcome.ACCEPTED
    assert batch.fail(3, "spot-a", 1, "e3", True) == (Outcome.ACCEPTED, True)
    assert batch.fail(4, "spot-a", 1, "e4", False) == (Outcome.ACCEPTED, False)
    assert batch.reap(6, "spot down") is not None
    assert batch.reap(7, "spot down") is not None
    batch.record(at(1))
    stored = events(block)
    assert [type(e) for e in stored] == [TaskBlock.Completed, TaskBlock.Failed, TaskBlock.Reaped]
    completed, failed, reaped = stored
    assert completed.indexes == [0, 1, 2]
    assert (failed.indexes, failed.errors, failed.retried) == ([3, 4], ["e3", "e4"], [True, False])
    assert (reaped.indexes, reaped.holders, reaped.retried) == (
        [6, 7],
        ["spot-b", "spot-b"],
        [True, True],
    )
    assert [block.view(i).status for i in range(10)] == [
        DONE,
        DONE,
        DONE,
        NEW,
        FAILED,
        RUNNING,
        NEW,
        NEW,
        NEW,
        NEW,
    ]


def test_reaps_with_different_reasons_are_one_event_per_reason() -> None:
    block = make_block(count=3)
    block.claim([0, 1, 2], ["spot-a"] * 3, T0)
    events(block)
    batch = BlockBatch(block)
    batch.reap(0, "spot down")
    batch.reap(1, "lease expired")
    batch.reap(2, "spot down")
    batch.record(T0)
    stored = events(block)
    assert [(e.reason, e.indexes) for e in stored] == [
        ("spot down", [0, 2]),
        ("lease expired", [1]),
    ]


def test_an_empty_batch_records_nothing() -> None:
    block = make_block()
    BlockBatch(block).record(T0)
    assert events(block) == []


def test_completions_above_the_event_size_limit_are_split() -> None:
    block = make_block(count=3)
    block.claim([0, 1, 2], ["spot-a"] * 3, T0)
    events(block)
    big = "x" * (BlockBatch.MAX_EVENT_BYTES // 2)
    batch = BlockBatch(block)
    for i in range(3):
        batch.complete(completion(i, "spot-a", result=big), 1)
    batch.record(T0)
    stored = events(block)
    assert all(isinstance(e, TaskBlock.Completed) for e in stored)
    assert [e.indexes for e in stored] == [[0], [1], [2]]
    assert block.is_finished()


def encoded_sizes(stored: list[object]) -> list[int]:
    """Each event's size as the relay sends it: an Avro envelope."""
    codec = Codec()
    return [len(codec.encode(message_from_event(e, 1))) for e in stored]


#: What an event may take beyond its texts' chunk (ids, numbers, envelope).
FRAMING = 4096


def test_failures_above_the_event_size_limit_are_split_and_each_event_is_under_it() -> None:
    block = make_block(count=500)
    block.claim(list(range(500)), ["spot-a"] * 500, T0)
    events(block)
    batch = BlockBatch(block)
    for i in range(500):  # 8 KiB error texts, the API's cap: 4 MB in all
        batch.fail(i, "spot-a", 1, f"{i:04d}" + "E" * 8188, retriable=i % 2 == 0)
    batch.record(T0)
    stored = events(block)
    assert all(isinstance(e, TaskBlock.Failed) for e in stored)
    assert len(stored) >= 4 * 1024 * 1024 // BlockBatch.MAX_EVENT_BYTES
    assert max(encoded_sizes(stored)) <= BlockBatch.MAX_EVENT_BYTES + FRAMING
    indexes = [i for e in stored for i in e.indexes]  # type: ignore[attr-defined]
    assert indexes == list(range(500))
    errors = [x for e in stored for x in e.errors]  # type: ignore[attr-defined]
    assert [x[:4] for x in errors] == [f"{i:04d}" for i in range(500)]
    # retriable failures are NEW again, the others FAILED; each used one attempt
    assert [block.view(i).status for i in range(4)] == [NEW, FAILED, NEW, FAILED]
    assert block.new_count() == 250
    assert all(block.view(i).holder is None for i in range(500))
    assert {block.view(i).attempts for i in range(500)} == {1}


def test_failure_sizes_count_utf8_bytes_not_characters() -> None:
    block = make_block(count=100)
    block.claim(list(range(100)), ["spot-a"] * 100, T0)
    events(block)
    batch = BlockBatch(block)
    for i in range(100):  # 8192 characters of 3 bytes each: 24 KiB an error
        batch.fail(i, "spot-a", 1, "€" * 8192, retriable=False)
    batch.record(T0)
    stored = events(block)
    assert len(stored) > 1
    assert max(encoded_sizes(stored)) <= BlockBatch.MAX_EVENT_BYTES + FRAMING
    assert block.is_finished()


def test_reaps_above_the_event_size_limit_are_split_and_each_event_is_under_it() -> None:
    holders = [f"spot-{n:03d}-" + "h" * 250 for n in range(2000)]
    block = make_block(count=2000)
    block.claim(list(range(2000)), holders, T0)
    events(block)
    batch = BlockBatch(block)
    for i in range(2000):
        batch.reap(i, "spot down")
    batch.record(T0)
    stored = events(block)
    assert len(stored) > 1
    assert all(isinstance(e, TaskBlock.Reaped) and e.reason == "spot down" for e in stored)
    assert max(encoded_sizes(stored)) <= BlockBatch.MAX_EVENT_BYTES + FRAMING
    assert [h for e in stored for h in e.holders] == holders  # type: ignore[attr-defined]
    assert block.new_count() == 2000


def test_completions_are_split_and_each_event_is_under_the_limit() -> None:
    block = make_block(count=200)
    block.claim(list(range(200)), ["spot-a"] * 200, T0)
    events(block)
    batch = BlockBatch(block)
    for i in range(200):
        batch.complete(completion(i, "spot-a", result='"' + "r" * 16000 + '"'), 1)
    batch.record(T0)
    stored = events(block)
    assert len(stored) > 1
    assert max(encoded_sizes(stored)) <= BlockBatch.MAX_EVENT_BYTES + FRAMING
    assert block.is_finished()
