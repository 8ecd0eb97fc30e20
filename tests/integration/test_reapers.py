"""Reapers: exactly one process runs them, chosen by a PostgreSQL advisory lock."""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import pytest

from service.reapers import Reapers
from service.settings import load_settings

pytestmark = pytest.mark.integration


async def test_only_one_process_holds_the_reaper_lock_until_it_lets_go() -> None:
    settings = load_settings({"TADPOLE_SCHEMA": f"reapers_{uuid4().hex[:8]}"})
    first, second = Reapers(settings, writer=None), Reapers(settings, writer=None)  # type: ignore[arg-type]
    try:
        assert await first._leader() is True
        assert await second._leader() is False
        assert await first._leader() is True  # it keeps leading on later rounds
        await first.stop()  # it lets go of the lock
        deadline = time.monotonic() + 10
        while not await second._leader():  # the next round of the other process takes over
            assert time.monotonic() < deadline, "the lock was never released"
            await asyncio.sleep(0.05)
        other = Reapers(load_settings({"TADPOLE_SCHEMA": "another_deployment"}), writer=None)  # type: ignore[arg-type]
        try:
            assert await other._leader() is True  # another deployment has its own lock
        finally:
            await other.stop()
    finally:
        await first.stop()
        await second.stop()
