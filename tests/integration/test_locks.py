"""The advisory locks in PostgreSQL: one session at a time holds each."""

from __future__ import annotations

from collections.abc import Iterator
from uuid import uuid4

import psycopg
import pytest

from service.settings import Settings
from streaming.locks import AdvisoryLock, reapers_lock

pytestmark = pytest.mark.integration


@pytest.fixture
def sessions() -> Iterator[tuple[psycopg.Connection[object], psycopg.Connection[object]]]:
    url = Settings().database_url
    with psycopg.connect(url, autocommit=True) as a, psycopg.connect(url, autocommit=True) as b:
        yield a, b


def taken(conn: psycopg.Connection[object], lock: AdvisoryLock) -> bool:
    row = conn.execute(*lock.try_lock()).fetchone()
    return bool(row and row[0])


def test_a_lock_is_held_by_one_session_until_it_lets_go(
    sessions: tuple[psycopg.Connection[object], psycopg.Connection[object]],
) -> None:
    a, b = sessions
    # A key of this test's own: the real ones may be held by a test running beside it.
    for lock in (AdvisoryLock(int(uuid4().int % 2**62)), reapers_lock(f"t{uuid4().hex}")):
        assert taken(a, lock)
        assert not taken(b, lock)
        a.execute(*lock.unlock())
        assert taken(b, lock)
        b.execute(*lock.unlock())


def test_each_deployment_has_its_own_reapers_lock(
    sessions: tuple[psycopg.Connection[object], psycopg.Connection[object]],
) -> None:
    a, b = sessions
    name = uuid4().hex
    assert taken(a, reapers_lock(f"{name}_one"))
    assert taken(b, reapers_lock(f"{name}_two"))
    a.execute("SELECT pg_advisory_unlock_all()")
    b.execute("SELECT pg_advisory_unlock_all()")
