"""The composition root: builds the store, views and processes from :class:`Settings`."""

from __future__ import annotations

import logging
import math
from urllib.parse import unquote, urlparse

import psycopg
from psycopg import sql

from eventstore import recorder
from eventstore.store import TadpoleStore
from service.settings import Settings
from streaming.deadletters import DeadLetters
from streaming.locks import STORE_SCHEMA_LOCK
from streaming.progress import Progress


def store_env(settings: Settings) -> dict[str, str]:
    """The ``eventsourcing`` settings for the PostgreSQL event store."""
    url = urlparse(settings.database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "APPLICATION_RECORDER_TOPIC": recorder.TOPIC,  # appends in one round trip
        "POSTGRES_DBNAME": unquote(url.path.lstrip("/")) or "postgres",
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_SCHEMA": settings.store_schema,
        "POSTGRES_POOL_SIZE": "4",
        # How long a read waits for a pooled connection (the library retries it ten
        # times): bounded by the command timeout, so that a reload or a load on an
        # unreachable store gives up in seconds, not minutes.
        "POSTGRES_CONNECT_TIMEOUT": str(max(1, math.ceil(settings.command_timeout))),
        "CREATE_TABLE": "y",
    }


def open_store(settings: Settings) -> TadpoleStore:
    """The event store, its schema and tables created if missing.

    Processes start together; PostgreSQL refuses concurrent DDL on the same
    objects ("tuple concurrently updated"), so creation is serialised.
    """
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(*STORE_SCHEMA_LOCK.lock())
        try:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    sql.Identifier(settings.store_schema)
                )
            )
            store = TadpoleStore(store_env(settings))
            conn.execute(DeadLetters(store).ddl())
            conn.execute(Progress(store).ddl())
            return store
        finally:
            conn.execute(*STORE_SCHEMA_LOCK.unlock())


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
