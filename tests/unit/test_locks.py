"""The advisory-lock keys: fixed values, distinct purposes, and the SQL that takes them."""

from __future__ import annotations

from streaming.locks import READ_SCHEMA_LOCK, STORE_SCHEMA_LOCK, AdvisoryLock, reapers_lock


def test_the_keys_never_change_so_two_versions_take_the_same_locks() -> None:
    assert STORE_SCHEMA_LOCK.key == 0x7AD9001
    assert READ_SCHEMA_LOCK.key == 0x7AD9002
    assert reapers_lock("tadpole").key == "tadpole-reapers:tadpole"


def test_every_purpose_and_deployment_has_its_own_lock() -> None:
    locks = {STORE_SCHEMA_LOCK, READ_SCHEMA_LOCK, reapers_lock("a"), reapers_lock("b")}
    assert len(locks) == 4
    assert reapers_lock("a") == reapers_lock("a")


def test_a_numbered_lock_is_passed_as_is_and_a_named_one_hashed() -> None:
    assert AdvisoryLock(7).lock() == ("SELECT pg_advisory_lock(%s)", (7,))
    assert AdvisoryLock(7).xact_lock() == ("SELECT pg_advisory_xact_lock(%s)", (7,))
    assert AdvisoryLock("n").try_lock() == ("SELECT pg_try_advisory_lock(hashtext(%s))", ("n",))
    assert AdvisoryLock("n").unlock() == ("SELECT pg_advisory_unlock(hashtext(%s))", ("n",))
