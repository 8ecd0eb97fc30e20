"""How far each pipeline step got in the store's log, for health.

A projector applies events from Kafka in no global order, so the position it
shows is the highest store position it applied (from Kafka or from the store);
its periodic catch-up from the store fills whatever lies below. The relay's own
position (``relay_position``) is exact and is read from there.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from psycopg import sql

from domain.store import TadpoleStore

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


class Progress:
    """The ``progress`` table beside the event store, through the store's pool."""

    def __init__(self, store: TadpoleStore):
        datastore = getattr(store.recorder, "datastore", None)
        if datastore is None:
            raise TypeError("progress needs the PostgreSQL event store")
        self._transaction = datastore.transaction
        self.schema = sql.Identifier(datastore.schema)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self.schema)

    def ddl(self) -> sql.Composed:
        return self._q(DDL)

    def publish(self, name: str, position: int) -> None:
        with self._transaction(commit=True) as cur:
            cur.execute(
                self._q(
                    "INSERT INTO {schema}.progress VALUES (%s, %s, now()) ON CONFLICT (name) "
                    "DO UPDATE SET position = EXCLUDED.position, updated_at = now()"
                ),
                (name, position),
            )

    def positions(self) -> dict[str, tuple[int, datetime | None]]:
        """Every step's position (the relay's included) and when it last moved."""
        with self._transaction(commit=False) as cur:
            cur.execute(
                self._q(
                    "SELECT name, position, updated_at FROM {schema}.progress "
                    "UNION ALL SELECT name, position, NULL FROM {schema}.relay_position"
                )
            )
            rows: list[Any] = cur.fetchall()
        return {row["name"]: (int(row["position"]), row["updated_at"]) for row in rows}
