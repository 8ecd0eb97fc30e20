"""The jobs family's state and its part of a batch: the hot path.

Open work is the task blocks with unfinished tasks, and the jobs they belong
to (their sweeps give the tasks' payloads): those stay in memory, so deciding
a claim or a completion needs no read. A finished block leaves; its job leaves
with its last block. A report on a finished task, or a retried job creation,
loads what it names on demand, and a few such are kept among the recently used.

Per batch, all the claims on a block are one stored event, and so are its
completions, failures and reaps (see :class:`~domain.jobs.tasks.BlockBatch`).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from uuid import UUID, uuid4

from domain.family import (
    Config,
    ConflictError,
    HolderDue,
    Loader,
    NotFoundError,
    Phase,
    Reaped,
    Recent,
    Result,
)
from domain.ids import (
    TaskRef,
    UnknownIdError,
    block_id,
    job_for_key,
    parse_job_id,
    parse_task_id,
    task_id,
)
from domain.jobs.commands import (
    CompleteTask,
    CreateJob,
    FailTask,
    Finished,
    JobCreated,
    ReapTasks,
    ReleaseClaims,
)
from domain.jobs.job import Job
from domain.jobs.sweeps import parse
from domain.jobs.tasks import RUNNING, BlockBatch, Completion, TaskBlock
from domain.processor import UnitOfWork
from domain.spots import FAMILY as SPOTS
from domain.spots.commands import ClaimedTask
from domain.spots.state import SpotsWork

#: Tasks per block: one aggregate's worth of claims, completions and failures.
BLOCK_SIZE = 500


class OpenJobs:
    """Unfinished task blocks and their jobs, in memory."""

    def __init__(self, config: Config):
        self.max_attempts = config.max_attempts
        self.jobs: dict[UUID, Job] = {}
        self.blocks: dict[UUID, TaskBlock] = {}
        #: Blocks with NEW tasks, in the order they became claimable.
        self.claimable: dict[UUID, None] = {}
        #: How many of each job's blocks are in :attr:`blocks`.
        self._open_blocks: dict[UUID, int] = {}
        self.recent_jobs: Recent[UUID, Job] = Recent(config.recent)
        self.recent_blocks: Recent[UUID, TaskBlock] = Recent(config.recent)
        self._load: Loader = lambda uuid, kind: None

    def recover(self, load: Loader, open_ids: Iterable[UUID], now: datetime) -> None:
        for kept in (self.jobs, self.blocks, self.claimable, self._open_blocks):
            kept.clear()
        self.recent_jobs.clear()
        self.recent_blocks.clear()
        self._load = load
        for uuid in open_ids:
            block = load(uuid, TaskBlock)
            if block is None or block.is_finished():
                continue
            job = self.job(job_uuid(block))
            if job is not None:
                self.jobs[job.id] = job
                self.recent_jobs.pop(job.id)
                self._hold(block)

    def held(self, uuid: UUID) -> Job | TaskBlock | None:
        return (
            self.blocks.get(uuid)
            or self.jobs.get(uuid)
            or self.recent_blocks.get(uuid)
            or self.recent_jobs.get(uuid)
        )

    def job(self, uuid: UUID) -> Job | None:
        """The job, from memory or else from the store."""
        job = self.jobs.get(uuid) or self.recent_jobs.get(uuid)
        if job is None:
            job = self._load(uuid, Job)
            if job is not None:
                self.recent_jobs.put(uuid, job)
        return job

    def block(self, job: Job, number: int) -> TaskBlock | None:
        """Block ``number`` of ``job``, from memory or else from the store."""
        uuid = block_id(job.id, number)
        block = self.blocks.get(uuid) or self.recent_blocks.get(uuid)
        if block is None:
            block = self._load(uuid, TaskBlock)
            if block is not None:
                self.keep(block)
        return block

    def block_ids(self, job: UUID) -> list[UUID]:
        """The blocks of a job in memory; none if the job is not."""
        found = self.jobs.get(job) or self.recent_jobs.get(job)
        return found.block_ids() if found is not None else []

    def keep(self, aggregate: object) -> None:
        if isinstance(aggregate, Job):
            if aggregate.id not in self.jobs:
                self.recent_jobs.put(aggregate.id, aggregate)
        elif isinstance(aggregate, TaskBlock):
            if not aggregate.is_finished():
                self._hold(aggregate)
            elif aggregate.id in self.blocks:
                self._let_go(aggregate)
            else:
                self.recent_blocks.put(aggregate.id, aggregate)

    def _hold(self, block: TaskBlock) -> None:
        if block.id not in self.blocks:
            job = job_uuid(block)
            self._open_blocks[job] = self._open_blocks.get(job, 0) + 1
            found = self.recent_jobs.pop(job)
            if found is not None:
                self.jobs[job] = found
            self.recent_blocks.pop(block.id)
        self.blocks[block.id] = block
        if block.new_count():
            self.claimable[block.id] = None

    def _let_go(self, block: TaskBlock) -> None:
        """A block finished: it leaves memory, and its job with its last block."""
        del self.blocks[block.id]
        self.claimable.pop(block.id, None)
        self.recent_blocks.put(block.id, block)
        job = job_uuid(block)
        left = self._open_blocks.get(job, 1) - 1
        if left > 0:
            self._open_blocks[job] = left
            return
        self._open_blocks.pop(job, None)
        found = self.jobs.pop(job, None)
        if found is not None:
            self.recent_jobs.put(job, found)

    def claimable_count(self, ts: float, limit: int) -> int:
        """How many NEW tasks a claim could take now (counted up to ``limit``)."""
        found = 0
        for uuid in self.claimable:
            block = self.blocks.get(uuid)
            found += block.new_count() if block is not None else 0
            if found >= limit:
                break
        return min(found, limit)

    def begin(self, uow: UnitOfWork) -> JobsWork:
        return JobsWork(self, uow)


class JobsWork:
    """The jobs' part of one batch: which blocks it finishes and claims from."""

    def __init__(self, state: OpenJobs, uow: UnitOfWork):
        self.state = state
        self.uow = uow
        self.finishing: dict[UUID, BlockBatch] = {}
        self.claims: dict[UUID, tuple[list[int], list[str]]] = {}
        self.picked: dict[UUID, set[int]] = {}
        self.new_blocks: list[TaskBlock] = []
        self.new_jobs: dict[UUID, Job] = {}

    @property
    def spots(self) -> SpotsWork:
        work: SpotsWork = self.uow.work(SPOTS)
        return work

    # ---- creating ------------------------------------------------------------------

    def create_job(self, c: CreateJob) -> Result:
        sweep_text = c.sweep.to_json()
        uuid = job_for_key(c.idempotency_key) if c.idempotency_key else uuid4()
        existing = self.new_jobs.get(uuid) or (self.state.job(uuid) if c.idempotency_key else None)
        if existing is not None:
            if existing.sweep != sweep_text:
                return ConflictError("Idempotency-Key was used before with a different job")
            return JobCreated(existing.public_id, existing.total_tasks, replayed=True)
        job = Job.create(
            uuid,
            sweep_text,
            c.sweep.total_tasks,
            BLOCK_SIZE,
            self.state.max_attempts,
            c.idempotency_key,
        )
        self.uow.add(job)
        self.new_jobs[uuid] = job
        for number, block_uuid in enumerate(job.block_ids()):
            first, count = job.block_range(number)
            block = TaskBlock.create(block_uuid, job.public_id, first, count, job.max_attempts)
            self.uow.add(block)
            self.new_blocks.append(block)
        return JobCreated(job.public_id, job.total_tasks, replayed=False)

    # ---- finishing -----------------------------------------------------------------

    def _task(self, text: str) -> tuple[TaskRef, BlockBatch] | None:
        try:
            ref = parse_task_id(text)
        except UnknownIdError:
            return None
        job = self.state.job(ref.job)
        if job is None or ref.index >= job.total_tasks:
            return None
        block = self.state.block(job, ref.index // job.block_size)
        if block is None:
            return None
        return ref, self._finishing(block)

    def _finishing(self, block: TaskBlock) -> BlockBatch:
        batch = self.finishing.get(block.id)
        if batch is None:
            batch = self.finishing[block.id] = BlockBatch(block)
        return batch

    def complete(self, c: CompleteTask) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        ref, batch = found
        completion = Completion(ref.index, c.spot_id, c.runtime_ms, c.iter, c.fopt, c.result_json)
        return Finished(batch.complete(completion, c.fence))

    def fail(self, c: FailTask) -> Result:
        found = self._task(c.task_id)
        if found is None:
            return NotFoundError("task not found")
        ref, batch = found
        outcome, retried = batch.fail(ref.index, c.spot_id, c.fence, c.error, c.retriable)
        return Finished(outcome, will_retry=retried)

    def reap_tasks(self, c: ReapTasks) -> Result:
        ts = self.uow.ts
        spots = self.spots

        def expired(holder: str, claimed_at: float) -> bool:
            return ts - max(claimed_at, spots.last_seen(holder, 0.0)) > c.threshold

        return Reaped(tasks=self.release(expired, "lease expired"))

    def release_claims(self, c: ReleaseClaims) -> Result:
        released: list[str] = []
        for task_text, holder, fence in c.claims:
            found = self._task(task_text)
            if found is None:
                continue
            ref, batch = found
            task = batch.view(ref.index)
            if (
                task.status == RUNNING
                and task.holder == holder
                and task.fence == fence
                and batch.reap(ref.index, c.reason) is not None
            ):
                released.append(task_text)
        return Reaped(tasks=released)

    def release(self, due: HolderDue, reason: str) -> list[str]:
        """Reap every RUNNING task whose holder ``due`` says is gone."""
        reaped: list[str] = []
        for block in list(self.state.blocks.values()):
            for index, task in block.running():
                if (
                    task.holder is not None
                    and due(task.holder, task.claimed_at or 0.0)
                    and self._finishing(block).reap(index, reason) is not None
                ):
                    reaped.append(task_id(job_uuid(block), index))
        return reaped

    # ---- claiming ------------------------------------------------------------------

    def offer(self, holder: str, n: int) -> list[ClaimedTask]:
        """Up to ``n`` NEW tasks for ``holder``, oldest claimable block first."""
        claimed: list[ClaimedTask] = []
        for block in self._claimable_blocks():
            picked = self.picked.setdefault(block.id, set())
            indexes = block.new_indexes(n - len(claimed), picked)
            if not indexes:
                continue
            picked.update(indexes)
            pending = self.claims.setdefault(block.id, ([], []))
            pending[0].extend(indexes)
            pending[1].extend([holder] * len(indexes))
            job = self._job_of(block)
            sweep = parse(job.sweep)
            fences = {i: block.view(i).fence + 1 for i in indexes}
            claimed.extend(
                ClaimedTask(task_id(job.id, i), sweep.payload(i), fences[i]) for i in indexes
            )
            if len(claimed) == n:
                break
        return claimed

    def _job_of(self, block: TaskBlock) -> Job:
        """The block's job: its sweep gives the tasks' payloads."""
        uuid = job_uuid(block)
        job = self.new_jobs.get(uuid) or self.state.job(uuid)
        if job is None:
            raise LookupError(f"block {block.id} names job {block.job_id}, which is not stored")
        return job

    def _claimable_blocks(self) -> Iterable[TaskBlock]:
        yield from self.new_blocks
        claimable = self.state.claimable
        for uuid in list(claimable):
            kept = self.state.blocks.get(uuid)
            if kept is None or not kept.new_count():
                claimable.pop(uuid, None)
                continue
            yield kept

    # ---- the end of each phase, and of the batch ------------------------------------

    def end_phase(self, phase: Phase) -> None:
        if phase is Phase.FINISH:
            self._record_finishes()
        elif phase is Phase.CLAIM:
            self._record_claims()

    def _record_finishes(self) -> None:
        for batch in self.finishing.values():
            if batch.completions or batch.failures or batch.reaps:
                batch.record(self.uow.now)
                self.uow.add(batch.block)
                if batch.block.new_count() and batch.block.id in self.state.blocks:
                    self.state.claimable[batch.block.id] = None  # retried: claimable now
        self.finishing.clear()

    def _record_claims(self) -> None:
        for uuid, (indexes, holders) in self.claims.items():
            block = self.uow.touched.get(uuid) or self.state.blocks[uuid]
            assert isinstance(block, TaskBlock)
            block.claim(indexes, holders, self.uow.now)
            self.uow.add(block)
        self.claims.clear()

    def commit(self) -> None:
        pass


def job_uuid(block: TaskBlock) -> UUID:
    """The job a block belongs to."""
    return parse_job_id(block.job_id)
