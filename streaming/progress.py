"""How far each pipeline step got in the store's log, for health.

A projector applies events from Kafka in no global order, so the position it
shows is the highest store position it applied (from Kafka or from the store);
its periodic catch-up from the store fills whatever lies below. The relay's own
position (``relay_position``) is exact and is read from there.
"""

from __future__ import annotations

from datetime import datetime

from streaming.besidestore import BesideStore

DDL = """
CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {schema}.progress (
    name text PRIMARY KEY,
    position bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {schema}.relay_position (
    name text PRIMARY KEY,
    position bigint NOT NULL
);
"""


class Progress(BesideStore):
    """The ``progress`` table."""

    DDL = DDL

    def publish(self, name: str, position: int) -> None:
        self._execute(
            "INSERT INTO {schema}.progress VALUES (%s, %s, now()) ON CONFLICT (name) "
            "DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
            (name, position),
        )

    def positions(self) -> dict[str, tuple[int, datetime | None]]:
        """Every step's position (the relay's included) and when it last moved."""
        rows = self._execute(
            "SELECT name, position, updated_at FROM {schema}.progress "
            "UNION ALL SELECT name, position, NULL FROM {schema}.relay_position"
        )
        return {row["name"]: (int(row["position"]), row["updated_at"]) for row in rows}
