"""The job-status rule in SQL, evaluated by PostgreSQL, agrees with the Python function."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from projections.status import job_running_sql, job_status, job_status_sql
from service.settings import Settings

pytestmark = pytest.mark.integration

#: Every (total, done, failed) with counts up to 4, including impossible ones
#: (more finished than total), and a few large ones.
GRID = [
    *itertools.product(range(5), repeat=3),
    (100_000, 99_999, 0),
    (100_000, 99_999, 1),
    (100_000, 0, 100_000),
    (2**40, 2**40 - 1, 1),
]


def test_postgresql_and_python_give_every_job_the_same_status() -> None:
    query = (
        "SELECT c.total, c.done, c.failed, "
        f"{job_status_sql('c.total', 'c.done', 'c.failed')}, "
        f"{job_running_sql('c.total', 'c.done', 'c.failed')} "
        "FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[]) AS c(total, done, failed)"
    )
    columns = [list(column) for column in zip(*GRID, strict=True)]
    with psycopg.connect(Settings().database_url, autocommit=True) as conn:
        rows = conn.execute(query, columns).fetchall()
    assert len(rows) == len(GRID)
    wrong = [
        (total, done, failed, status, job_status(total, done, failed))
        for total, done, failed, status, _ in rows
        if status != job_status(total, done, failed)
    ]
    assert not wrong, f"(total, done, failed, SQL, Python) that disagree: {wrong}"
    running = [row[:3] for row in rows if row[4] != (job_status(*row[:3]) == "RUNNING")]
    assert not running, f"counts where the SQL running condition disagrees: {running}"
