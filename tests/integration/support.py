"""Helpers the integration tests share: waiting with a deadline, running workers in threads."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from streaming.relay import Relay


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``predicate`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@contextlib.contextmanager
def running(*workers: Any) -> Iterator[None]:
    """Run each ``worker.run()`` in a thread; ``stop()`` them and fail on their errors."""
    errors: list[BaseException] = []

    def target(worker: Any) -> None:
        try:
            worker.run()
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=target, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for worker in workers:
            worker.stop()
        for thread in threads:
            thread.join(60)
    assert not any(t.is_alive() for t in threads), "a worker did not stop"
    assert errors == [], f"a worker failed: {errors!r}"


def relay_all(relay: Relay) -> int:
    """Call ``relay_once`` until the store has nothing more; the last position."""
    position = relay.position.get()
    while moved := relay.relay_once(position):
        position = moved
    return position
