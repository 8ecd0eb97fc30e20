"""Execution contexts (seed 000): hierarchies and properties, changed by ModifyContext.

A low-rate family: nothing is open work; contexts are loaded on demand.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from domain.audit import whole
from domain.contexts.commands import ContextModified, ModifyContext
from domain.contexts.context import Context
from domain.family import Family, Result
from domain.ids import context_uuid
from domain.lowrate import LowRateWork, low_rate


class ContextsWork(LowRateWork):
    def modify(self, c: ModifyContext) -> Result:
        uuid = context_uuid(c.context_id)
        context = self.uow.get(uuid, Context)
        if context is None:
            context = Context.create(
                uuid, c.context_id, list(c.hierarchies), c.properties, self.uow.now
            )
            self.uow.add(context)
            return ContextModified(c.context_id, created=True, changed=True)
        changed = context.modify(list(c.hierarchies), c.properties, self.uow.now)
        if changed:
            self.uow.add(context)
        return ContextModified(c.context_id, created=False, changed=changed)


def _reads(c: ModifyContext) -> Iterable[UUID]:
    return (context_uuid(c.context_id),)


FAMILY = Family(
    name="contexts",
    events=(Context.Created, Context.Modified),
    topic="system_events",
    handlers={ModifyContext: ContextsWork.modify},
    results=(ContextModified,),
    state=low_rate(ContextsWork),
    audit={"context": whole(context_uuid, Context)},
    reads={ModifyContext: _reads},
)

__all__ = ["FAMILY", "Context", "ContextModified", "ModifyContext"]
