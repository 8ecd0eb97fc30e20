"""Spots: worker nodes that register, heartbeat, claim and report.

Open work: the spots that are UP.
"""

from __future__ import annotations

from domain.audit import whole
from domain.family import Family, Phase, Reaped
from domain.ids import parse_spot_id
from domain.spots.commands import (
    Claimed,
    ClaimedTask,
    ClaimTasks,
    Heartbeat,
    Hello,
    ReapSpots,
    SpotRegistered,
)
from domain.spots.spot import DOWN, UP, Spot
from domain.spots.state import LiveSpots, SpotsWork

FAMILY = Family(
    name="spots",
    events=(Spot.Registered, Spot.HeartbeatRecorded, Spot.MarkedDown, Spot.CameUp),
    topic="agent_lifecycle",
    handlers={
        Hello: SpotsWork.hello,
        Heartbeat: SpotsWork.heartbeat,
        ReapSpots: SpotsWork.reap_spots,
        ClaimTasks: SpotsWork.claim,
    },
    phases={ReapSpots: Phase.FINISH, ClaimTasks: Phase.CLAIM},
    results=(SpotRegistered, Claimed, Reaped),
    state=LiveSpots,
    open_when={Spot: lambda spot: spot.status == UP},
    audit={"spot": whole(parse_spot_id, Spot)},
    legacy_topics={"domain.spots:Spot": Spot},
)

__all__ = [
    "DOWN",
    "FAMILY",
    "UP",
    "ClaimTasks",
    "Claimed",
    "ClaimedTask",
    "Heartbeat",
    "Hello",
    "LiveSpots",
    "ReapSpots",
    "Spot",
    "SpotRegistered",
]
