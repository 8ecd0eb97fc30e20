"""Dead letters: stored events that one pipeline step could not take, with the reason.

A relay that cannot encode or produce an event, or a projector whose read model
cannot apply one, records it here and carries on with the next event, so one bad
event never freezes the pipeline for everyone. Each letter names the step, the
aggregate id and version, the store position and the error; health counts the
letters not yet re-applied, and ``tadpole dead-letters`` lists them and asks for
their re-application once the cause is fixed.

A projector *parks* the aggregate of a dead letter: it applies none of that
aggregate's later events (they would only be applied out of order), and its
read model keeps the aggregate at the version before the letter. Re-applying
un-parks it and heals it from the store, so every one of its events is applied
once, in order. Other aggregates go on as usual.

The letters live in PostgreSQL beside the event store (its schema), whichever
read model the step feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from streaming.besidestore import BesideStore

log = logging.getLogger(__name__)

OPEN, RETRY, RESOLVED = "open", "retry", "resolved"
RELAY = "relay"
#: Longest error text kept per letter.
MAX_ERROR = 2000

DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.dead_letters (
    id bigserial PRIMARY KEY,
    stage text NOT NULL,
    aggregate_id uuid NOT NULL,
    version bigint NOT NULL,
    position bigint NOT NULL,
    event_type text NOT NULL,
    error text NOT NULL,
    state text NOT NULL DEFAULT 'open',
    attempts integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stage, aggregate_id, version)
);
CREATE INDEX IF NOT EXISTS dead_letters_unresolved
    ON {schema}.dead_letters (stage) WHERE state <> 'resolved';
"""


def projector_stage(read_model: str) -> str:
    """The stage name of a projector: ``projector.postgres``."""
    return f"projector.{read_model}"


@dataclass(frozen=True)
class DeadLetter:
    id: int
    stage: str
    aggregate_id: UUID
    version: int
    position: int
    event_type: str
    error: str
    state: str
    attempts: int
    created_at: datetime
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "stage": self.stage,
            "aggregateId": str(self.aggregate_id),
            "version": self.version,
            "position": self.position,
            "type": self.event_type,
            "error": self.error,
            "state": self.state,
            "attempts": self.attempts,
            "createdAt": self.created_at.isoformat(),
            "updatedAt": self.updated_at.isoformat(),
        }


class DeadLetters(BesideStore):
    """The dead-letter table."""

    DDL = DDL

    def record(
        self, stage: str, aggregate_id: UUID, version: int, position: int, kind: str, error: str
    ) -> None:
        """Record (or record again) that ``stage`` could not take this event."""
        self._execute(
            "INSERT INTO {schema}.dead_letters "
            "(stage, aggregate_id, version, position, event_type, error) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (stage, aggregate_id, version) "
            "DO UPDATE SET error = EXCLUDED.error, state = 'open', updated_at = now(), "
            "attempts = {schema}.dead_letters.attempts + 1, "
            "position = GREATEST({schema}.dead_letters.position, EXCLUDED.position)",
            # The reason may quote the bad value itself: it must fit a text column.
            (
                stage,
                aggregate_id,
                version,
                position,
                kind,
                error[:MAX_ERROR].replace("\x00", "\\0"),
            ),
        )
        log.error(
            "%s: dead-lettered %s %s v%d (position %d): %s",
            stage,
            kind,
            aggregate_id,
            version,
            position,
            error[:300],
        )

    def unresolved(self, stage: str | None = None) -> list[DeadLetter]:
        """Letters not yet re-applied, oldest first (of one stage, or every one)."""
        rows = self._execute(
            "SELECT * FROM {schema}.dead_letters WHERE state <> 'resolved' "
            "AND (%s::text IS NULL OR stage = %s) ORDER BY id",
            (stage, stage),
        )
        return [DeadLetter(**row) for row in rows]

    def listing(self, stage: str | None = None, resolved: bool = False) -> list[DeadLetter]:
        rows = self._execute(
            "SELECT * FROM {schema}.dead_letters WHERE (%s OR state <> 'resolved') "
            "AND (%s::text IS NULL OR stage = %s) ORDER BY id",
            (resolved, stage, stage),
        )
        return [DeadLetter(**row) for row in rows]

    def parked(self, stage: str) -> set[UUID]:
        """Aggregates whose events ``stage`` holds back until their letters are re-applied."""
        return {d.aggregate_id for d in self.unresolved(stage)}

    def due(self, stage: str) -> list[DeadLetter]:
        """Letters someone asked to re-apply."""
        return [d for d in self.unresolved(stage) if d.state == RETRY]

    def resolve(self, ids: Iterable[int]) -> None:
        self._execute(
            "UPDATE {schema}.dead_letters SET state = 'resolved', updated_at = now() "
            "WHERE id = ANY(%s)",
            (list(ids),),
        )

    def request_retry(self, ids: Iterable[int] | None = None, stage: str | None = None) -> int:
        """Ask the steps to re-apply these open letters (all, without ``ids``); how many."""
        rows = self._execute(
            "UPDATE {schema}.dead_letters SET state = 'retry', updated_at = now() "
            "WHERE state = 'open' AND (%s::bigint[] IS NULL OR id = ANY(%s)) "
            "AND (%s::text IS NULL OR stage = %s) RETURNING id",
            (None if ids is None else list(ids),) * 2 + (stage, stage),
        )
        return len(rows)

    def counts(self) -> dict[str, int]:
        """Unresolved letters per stage."""
        rows = self._execute(
            "SELECT stage, count(*) AS n FROM {schema}.dead_letters "
            "WHERE state <> 'resolved' GROUP BY stage"
        )
        return {row["stage"]: int(row["n"]) for row in rows}
