"""A job's status, derived from its task counts: one rule, for Python and for SQL.

A job is RUNNING while some of its tasks are neither DONE nor FAILED; then it is
DONE if none FAILED, else FAILED. The Redis view applies :func:`job_status`; the
PostgreSQL read model writes the CASE that :func:`job_status_sql` renders from the
same constants, so the two read models cannot disagree about a job.
"""

from __future__ import annotations

from domain.jobs.tasks import DONE, FAILED, NEW, RUNNING

__all__ = [
    "DONE",
    "FAILED",
    "NEW",
    "RUNNING",
    "job_running_sql",
    "job_status",
    "job_status_sql",
    "literal",
]


def job_status(total: int, done: int, failed: int) -> str:
    """RUNNING, DONE or FAILED: the status of a job of ``total`` tasks with these counts."""
    if done + failed < total:
        return RUNNING
    return DONE if failed == 0 else FAILED


def job_running_sql(total: str, done: str, failed: str) -> str:
    """The SQL condition, over these column expressions, under which a job is RUNNING."""
    return f"{done} + {failed} < {total}"


def job_status_sql(total: str, done: str, failed: str) -> str:
    """:func:`job_status` as an SQL expression over these column expressions."""
    return (
        f"CASE WHEN {job_running_sql(total, done, failed)} THEN {literal(RUNNING)} "
        f"WHEN {failed} = 0 THEN {literal(DONE)} ELSE {literal(FAILED)} END"
    )


def literal(value: str) -> str:
    """``value`` as an SQL string literal, for statements composed once from constants."""
    return "'" + value.replace("'", "''") + "'"
