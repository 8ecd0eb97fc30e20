"""The event store: snapshots every 100 events, and no event near 1 MB."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from domain.ids import block_id, parse_job_id
from domain.jobs import CompleteTask, CreateJob, JobCreated, OpenJobs
from domain.jobs.sweeps import Range, Sweep
from domain.jobs.tasks import TaskBlock
from domain.processor import CommandProcessor
from domain.spots import ClaimTasks, Hello, SpotRegistered
from eventstore.store import StorePort, TadpoleStore, memory_env
from schemas.codec import Codec, message_from_event

ONE_MB = 1024 * 1024


def sweep(tasks: int) -> Sweep:
    return Sweep("/j.jar", "M", ("PSO",), Range(1, tasks, 1), Range(1, 1, 1), Range(1, 1, 1))


def test_a_block_is_snapshotted_every_100_events_and_loads_from_it() -> None:
    store = TadpoleStore(memory_env())
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    now = datetime.now(UTC)
    job, spot = processor.process([CreateJob(sweep(300)), Hello("10.0.0.1")], now)
    assert isinstance(job, JobCreated) and isinstance(spot, SpotRegistered)
    # One claim and one completion a batch: two events on the block each round.
    for n in range(110):
        now += timedelta(seconds=1)
        (claimed,) = processor.process([ClaimTasks(spot.spot_id, 1)], now)
        task = claimed.tasks[0]  # type: ignore[union-attr]
        processor.process(
            [CompleteTask(task.task_id, spot.spot_id, task.fence, 1, 1, float(n), None)], now
        )
    block = block_id(parse_job_id(job.job_id), 0)
    assert store.snapshots is not None
    versions = [s.originator_version for s in store.snapshots.get(block)]
    assert versions == [100, 200]
    # Loading starts from the snapshot and ends where the writer is.
    loaded = store.load(block)
    assert isinstance(loaded, TaskBlock)
    live = processor.state(OpenJobs).blocks[block]
    assert loaded.version == live.version == 221
    assert loaded.status == live.status
    assert loaded.fences == live.fences


def test_a_100000_task_job_is_stored_and_sent_in_small_messages() -> None:
    store = TadpoleStore(memory_env())
    processor = CommandProcessor(StorePort(store), 3, 5.0)
    (job,) = processor.process([CreateJob(sweep(100_000))], datetime.now(UTC))
    assert isinstance(job, JobCreated) and job.total_tasks == 100_000
    notifications = store.notifications(0, 1000)
    assert len(notifications) == 1 + 200  # the job and its 200 blocks of 500
    codec = Codec()
    for n in notifications:
        assert len(n.state) < ONE_MB // 100
        message = codec.encode(message_from_event(store.mapper.to_domain_event(n), n.id))
        assert len(message) < ONE_MB // 100
