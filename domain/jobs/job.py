"""Jobs: a parameter sweep whose tasks live in task blocks."""

from __future__ import annotations

from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.ids import block_id, job_id


class Job(Aggregate):
    """A submitted sweep. Its tasks are in ``block_count`` :class:`TaskBlock` aggregates."""

    class Created(Aggregate.Created):
        sweep: str
        total_tasks: int
        block_size: int
        max_attempts: int
        idempotency_key: str | None

    def __init__(
        self,
        sweep: str,
        total_tasks: int,
        block_size: int,
        max_attempts: int,
        idempotency_key: str | None,
    ):
        self.sweep = sweep
        self.total_tasks = total_tasks
        self.block_size = block_size
        self.max_attempts = max_attempts
        self.idempotency_key = idempotency_key

    @classmethod
    def create(
        cls,
        uuid: UUID,
        sweep: str,
        total_tasks: int,
        block_size: int,
        max_attempts: int,
        idempotency_key: str | None,
    ) -> Job:
        return cls._create(
            cls.Created,
            id=uuid,
            sweep=sweep,
            total_tasks=total_tasks,
            block_size=block_size,
            max_attempts=max_attempts,
            idempotency_key=idempotency_key,
        )

    @property
    def public_id(self) -> str:
        return job_id(self.id)

    @property
    def block_count(self) -> int:
        return -(-self.total_tasks // self.block_size)

    def block_ids(self) -> list[UUID]:
        return [block_id(self.id, n) for n in range(self.block_count)]

    def block_of(self, index: int) -> UUID:
        return block_id(self.id, index // self.block_size)

    def block_range(self, number: int) -> tuple[int, int]:
        """``(first, count)`` of block ``number``."""
        first = number * self.block_size
        return first, min(self.block_size, self.total_tasks - first)
