"""Projection dispatch: what a read model does with an event type it has no handler for.

Each read model maps the event types it shows to handlers (its ``HANDLED``) and
names those it leaves out on purpose (its ``NOT_SHOWN``). An event of any other
type (one a newer writer stores, say) changes nothing, is not a failure, and is
logged once per type: its version is still recorded as applied, so the model
does not stall on it.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Unhandled:
    """Notes the event types a read model neither handles nor leaves out on purpose."""

    def __init__(self, model: str, not_shown: frozenset[str]):
        self.model = model
        self.not_shown = not_shown
        self.seen: set[str] = set()

    def note(self, event_type: str) -> None:
        """Log, the first time only, that events of ``event_type`` are ignored."""
        if event_type in self.not_shown or event_type in self.seen:
            return
        self.seen.add(event_type)
        log.warning(
            "the %s read model has no handler for %s events: they are ignored",
            self.model,
            event_type,
        )
