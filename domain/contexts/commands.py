"""The contexts family's commands and results."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModifyContext:
    """Seed 000's ModifyContext: creates the context the first time."""

    context_id: str
    hierarchies: tuple[str, ...]
    properties: dict[str, str]


@dataclass(frozen=True)
class ContextModified:
    context_id: str
    created: bool
    changed: bool
