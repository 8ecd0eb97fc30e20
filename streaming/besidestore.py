"""Tables the pipeline keeps beside the event store, in its schema, through its pool."""

from __future__ import annotations

from typing import Any, ClassVar

from psycopg import sql

from eventstore.store import TadpoleStore


class BesideStore:
    """A table in the event store's PostgreSQL schema, used through the store's own pool.

    A subclass gives its ``DDL`` (``{schema}`` stands for the store's schema);
    ``service.wiring.open_store`` runs it once, under the schema lock.
    """

    DDL: ClassVar[str]

    def __init__(self, store: TadpoleStore):
        datastore = getattr(store.recorder, "datastore", None)
        if datastore is None:
            raise TypeError(f"{type(self).__name__} needs the PostgreSQL event store")
        self._transaction = datastore.transaction
        self.schema = sql.Identifier(datastore.schema)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(schema=self.schema)

    def _execute(self, text: str, params: Any = None) -> list[dict[str, Any]]:
        """One statement in its own transaction; its rows, if it returns any."""
        with self._transaction(commit=True) as cur:
            cur.execute(self._q(text), params)
            return list(cur.fetchall()) if cur.description else []

    def ddl(self) -> sql.Composed:
        return self._q(self.DDL)
