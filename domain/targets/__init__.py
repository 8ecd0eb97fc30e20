"""Targets (seed 000): where agents are placed, with their state, capabilities and limits.

A low-rate family: nothing is open work; targets are loaded on demand.
"""

from __future__ import annotations

from domain.audit import whole
from domain.family import Family
from domain.ids import target_uuid
from domain.lowrate import low_rate
from domain.targets.commands import TargetUpdated, UpdateTarget
from domain.targets.state import TargetsWork, update_reads
from domain.targets.target import READY, TARGET_STATES, Limits, Target, TargetError

FAMILY = Family(
    name="targets",
    events=(Target.Registered, Target.Updated, Target.Reserved, Target.Released),
    topic="system_events",
    handlers={UpdateTarget: TargetsWork.update},
    results=(TargetUpdated,),
    state=low_rate(TargetsWork),
    audit={"target": whole(target_uuid, Target)},
    reads={UpdateTarget: update_reads},
)

__all__ = [
    "FAMILY",
    "READY",
    "TARGET_STATES",
    "Limits",
    "Target",
    "TargetError",
    "TargetUpdated",
    "UpdateTarget",
]
