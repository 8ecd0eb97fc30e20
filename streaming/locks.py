"""Every PostgreSQL advisory lock Tadpole takes, in one place.

The keys never change: two versions running side by side (a rolling restart)
must take the same lock for the same purpose. Each lock renders the statements
that take and release it, so no caller spells a key or ``hashtext`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

#: A statement and its parameters, for ``conn.execute(*statement)``.
Statement = tuple[str, tuple[int | str]]


@dataclass(frozen=True)
class AdvisoryLock:
    """One advisory lock: a bigint key, or a name PostgreSQL hashes with ``hashtext``."""

    key: int | str

    def _call(self, function: str) -> Statement:
        argument = "%s" if isinstance(self.key, int) else "hashtext(%s)"
        return f"SELECT {function}({argument})", (self.key,)

    def lock(self) -> Statement:
        """Wait for the lock; it is held until :meth:`unlock` or the session ends."""
        return self._call("pg_advisory_lock")

    def try_lock(self) -> Statement:
        """Take the lock if it is free; the row says whether it was taken."""
        return self._call("pg_try_advisory_lock")

    def unlock(self) -> Statement:
        return self._call("pg_advisory_unlock")

    def xact_lock(self) -> Statement:
        """Wait for the lock; it is held until the transaction ends."""
        return self._call("pg_advisory_xact_lock")


#: Creating the event store's schema and tables (and the dead-letter and progress
#: tables beside them): processes start together, and PostgreSQL refuses
#: concurrent DDL on the same objects.
STORE_SCHEMA_LOCK = AdvisoryLock(0x7AD9001)

#: Creating (or widening) the PostgreSQL read model's tables.
READ_SCHEMA_LOCK = AdvisoryLock(0x7AD9002)


def reapers_lock(store_schema: str) -> AdvisoryLock:
    """The lock whose holder runs TaskReaper and SpotReaper for one deployment.

    One per store schema: deployments that share a database each get their own
    active reapers.
    """
    return AdvisoryLock(f"tadpole-reapers:{store_schema}")
