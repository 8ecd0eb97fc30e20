"""The targets' part of a batch (a low-rate family)."""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from domain.family import Result
from domain.ids import target_uuid
from domain.lowrate import LowRateWork
from domain.targets.commands import TargetUpdated, UpdateTarget
from domain.targets.target import Target


class TargetsWork(LowRateWork):
    def update(self, c: UpdateTarget) -> Result:
        uuid = target_uuid(c.target_id)
        target = self.uow.get(uuid, Target)
        if target is None:
            target = Target.register(
                uuid, c.target_id, c.state, c.capabilities, c.limits, self.uow.now
            )
            self.uow.add(target)
            return TargetUpdated(c.target_id, created=True, changed=True)
        changed = target.update(c.state, c.capabilities, c.limits, self.uow.now)
        if changed:
            self.uow.add(target)
        return TargetUpdated(c.target_id, created=False, changed=changed)


def update_reads(c: UpdateTarget) -> Iterable[UUID]:
    return (target_uuid(c.target_id),)
