"""librdkafka's log lines, through Python logging, with repeats held back.

While a broker is down, every client logs a refused connection each time it
tries again: with the quick reconnects Tadpole wants (to notice a restarted
broker within a second) that is tens of lines a second per process, the same
line over and over. :data:`CLIENT_LOG` is the logger every client config of
:mod:`streaming.topics` hands to confluent-kafka (``logger=``); its
:class:`Throttle` lets a line through once per :data:`THROTTLE_INTERVAL` per
client and *kind* of line, and the next one that gets through says how many
were held back::

    FAIL [rdkafka#consumer-2] [thrd:127.0.0.1:9092/bootstrap]: ... Connection refused
    (after 0ms in state CONNECT) (41 more like it in the last 5s)

A line's kind is its client, level, facility and text with the broker's name
(and the client's thread: each broker it knows, its group coordinator) and every
number taken out, so a different message (another error, another state) still
shows at once. confluent-kafka hands the lines over in ``poll()``
(and ``flush()``, ``consume()``), on the polling thread.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

THROTTLE_INTERVAL: Final = 5.0
"""Seconds between two lines of the same kind from one client."""

_THREAD = re.compile(r"^\[thrd:[^\]]*\]:\s*")
# who says it: "127.0.0.1:9092/bootstrap: ", "GroupCoordinator: 127.0.0.1:9092: "...
_SPEAKERS = re.compile(r"^(?:\S+:\s+)+")
_NUMBER = re.compile(r"\d+")


@dataclass
class _Window:
    opened: float
    held: int = 0


class Throttle(logging.Filter):
    """Passes one record per kind every ``interval`` seconds; counts the rest.

    Args:
        interval: Seconds a kind of line stays held back after one got through.
        clock: Monotonic seconds (a parameter for the unit tests).
    """

    def __init__(
        self, interval: float = THROTTLE_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._windows: dict[tuple[object, ...], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = kind(record)
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.opened < self.interval:
                window.held += 1
                return False
            self._windows[key] = _Window(now)
            if len(self._windows) > 1000:  # one-off kinds must not pile up for ever
                self._forget(now)
        if window is not None and window.held:
            record.msg = f"{record.msg} (%d more like it in the last %.0fs)"
            record.args = (*_args(record), window.held, now - window.opened)
        return True

    def _forget(self, now: float) -> None:
        stale = [k for k, w in self._windows.items() if now - w.opened >= self.interval]
        for key in stale:
            del self._windows[key]


def _args(record: logging.LogRecord) -> tuple[object, ...]:
    args = record.args
    if isinstance(args, tuple):
        return args
    return () if args is None else (args,)


def kind(record: logging.LogRecord) -> tuple[object, ...]:
    """What makes two lines "the same": client, level, facility, text sans broker and numbers.

    confluent-kafka logs ``"%s [%s] %s"`` with (facility, client name, text).
    """
    args = _args(record)
    if len(args) == 3 and isinstance(args[2], str):
        facility, client, text = args[0], args[1], args[2]
        text = _SPEAKERS.sub("", _THREAD.sub("", text))
        return (record.levelno, client, facility, _NUMBER.sub("#", text))
    return (record.levelno, record.name, _NUMBER.sub("#", str(record.msg)))


CLIENT_LOG: Final = logging.getLogger("streaming.librdkafka")
"""The logger of every Kafka client (``logger=`` in the configs of :mod:`streaming.topics`)."""
CLIENT_LOG.addFilter(Throttle())
