"""A job's status rule: the Python function, and the SQL rendered from the same constants.

``tests/integration/test_job_status.py`` evaluates the SQL in PostgreSQL on a grid of
counts and checks it against the function.
"""

from __future__ import annotations

import pytest

from domain.jobs.tasks import DONE, FAILED, RUNNING
from projections.status import job_running_sql, job_status, job_status_sql, literal

#: (total, done, failed) → status
CASES = [
    ((1, 0, 0), RUNNING),
    ((3, 2, 0), RUNNING),
    ((3, 1, 1), RUNNING),
    ((3, 3, 0), DONE),
    ((3, 2, 1), FAILED),
    ((3, 0, 3), FAILED),
    ((100_000, 99_999, 0), RUNNING),
    ((100_000, 100_000, 0), DONE),
    ((0, 0, 0), DONE),  # no task left to run
]


@pytest.mark.parametrize(("counts", "status"), CASES)
def test_a_job_is_running_until_every_task_is_done_or_failed(
    counts: tuple[int, int, int], status: str
) -> None:
    assert job_status(*counts) == status


def test_the_sql_names_every_status_from_the_constants() -> None:
    rendered = job_status_sql("j.total", "t.done", "t.failed")
    assert rendered == (
        "CASE WHEN t.done + t.failed < j.total THEN 'RUNNING' "
        "WHEN t.failed = 0 THEN 'DONE' ELSE 'FAILED' END"
    )
    assert rendered.startswith(f"CASE WHEN {job_running_sql('j.total', 't.done', 't.failed')} ")
    for status in (RUNNING, DONE, FAILED):
        assert literal(status) in rendered


def test_a_literal_is_quoted_for_sql() -> None:
    assert literal("DONE") == "'DONE'"
    assert literal("it's") == "'it''s'"
