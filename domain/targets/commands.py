"""The targets family's commands and results."""

from __future__ import annotations

from dataclasses import dataclass

from domain.targets.target import Limits


@dataclass(frozen=True)
class UpdateTarget:
    """Seed 000's UpdateTarget: creates the target the first time."""

    target_id: str
    state: str
    capabilities: dict[str, str]
    limits: Limits


@dataclass(frozen=True)
class TargetUpdated:
    target_id: str
    created: bool
    changed: bool
