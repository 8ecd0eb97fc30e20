"""Step handlers: what a saga runner does with a step or compensation it took.

A handler is found by the step's (or compensation's) name. The built-in one asks
the writer to make the step's change to Tadpole's own aggregates in the batch
that records it (``apply``; see :mod:`domain.sagas.effects`). A hook
(``TADPOLE_SAGA_HOOKS``) first POSTs the step to an external system — retried
with exponential backoff and jitter (tenacity) behind a circuit breaker
(pybreaker), with seed 001's settings — and then lets the built-in effect be
made too, so Tadpole's agents, meshes and targets stay the truth either way.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import pybreaker
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sagas.client import Taken

log = logging.getLogger(__name__)

# Seed 001's resilience_patterns.
RETRY_ATTEMPTS = 3
RETRY_BASE_SECONDS = 1.0
RETRY_MAX_SECONDS = 10.0
BREAKER_FAILURES = 5
BREAKER_RECOVERY_SECONDS = 30.0
BREAKER_HALF_OPEN_REQUESTS = 3
BREAKER_SUCCESSES = 2


@dataclass(frozen=True)
class Report:
    """What a handler says of its step: done (with an outcome) or failed (with why)."""

    ok: bool
    outcome: Any = None
    error: str = ""
    apply: bool = True

    def fields(self) -> dict[str, Any]:
        """As a report's body fields."""
        return {"ok": self.ok, "outcome": self.outcome, "error": self.error, "apply": self.apply}


class Handler(Protocol):
    async def __call__(self, taken: Taken) -> Report: ...


class BuiltIn:
    """The writer makes the step's effect, in the batch that records it."""

    async def __call__(self, taken: Taken) -> Report:
        return Report(ok=True, apply=True)


class Breaker:
    """Seed 001's circuit breaker: opens after 5 consecutive failures, lets up to 3 trial
    requests through after 30 s, closes after 2 successes (pybreaker's state machine;
    the cap on concurrent trials is kept here, pybreaker has none)."""

    def __init__(self, name: str, recovery: float = BREAKER_RECOVERY_SECONDS):
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=BREAKER_FAILURES,
            reset_timeout=recovery,
            success_threshold=BREAKER_SUCCESSES,
            name=name,
        )
        self.trials = 0

    @property
    def state(self) -> str:
        return str(self.breaker.current_state)

    async def call(self, request: Any) -> Any:
        trial = self.breaker.current_state != pybreaker.STATE_CLOSED
        if trial and self.trials >= BREAKER_HALF_OPEN_REQUESTS:
            raise pybreaker.CircuitBreakerError("circuit open: its trial requests are in flight")
        self.trials += trial
        try:
            with self.breaker.calling():
                return await request()
        finally:
            self.trials -= trial


class _Retriable(Exception):
    """A hook answer worth trying again (a 5xx, a transport error)."""


class HttpHook:
    """POSTs the step to ``url``; 2xx is done (its JSON the outcome), 4xx a failure, and
    transport errors and 5xx are retried, then count against the breaker."""

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        breaker: Breaker,
        attempts: int = RETRY_ATTEMPTS,
        base: float = RETRY_BASE_SECONDS,
        most: float = RETRY_MAX_SECONDS,
    ):
        self.url = url
        self.client = client
        self.breaker = breaker
        self.attempts, self.base, self.most = attempts, base, most

    async def _post(self, taken: Taken) -> httpx.Response:
        body = {
            "sagaId": taken.saga_id,
            "kind": taken.kind,
            "step": taken.step,
            "compensation": taken.compensation if taken.is_compensation else None,
            "action": taken.name,
            "fenceToken": taken.fence,
            "params": taken.params,
            "outcome": taken.outcome,
        }
        try:
            response = await self.client.post(self.url, json=body)
        except httpx.HTTPError as error:
            raise _Retriable(f"{type(error).__name__}: {error}") from error
        if response.status_code >= 500:
            raise _Retriable(f"{self.url} answered {response.status_code}")
        return response

    async def __call__(self, taken: Taken) -> Report:
        async def attempt() -> httpx.Response:
            retrying = AsyncRetrying(
                stop=stop_after_attempt(self.attempts),
                wait=wait_exponential_jitter(
                    multiplier=self.base, max=self.most, exp_base=2, jitter=self.base
                ),
                retry=retry_if_exception(lambda e: isinstance(e, _Retriable)),
                reraise=True,
            )
            async for attempting in retrying:
                with attempting:
                    return await self._post(taken)
            raise AssertionError("unreachable")  # reraise=True raises the last error

        try:
            response = await self.breaker.call(attempt)
        except pybreaker.CircuitBreakerError as error:
            return Report(ok=False, error=f"hook {self.url}: {error}")
        except _Retriable as error:
            return Report(ok=False, error=f"hook {self.url} failed {self.attempts} times: {error}")
        if response.status_code >= 400:
            return Report(ok=False, error=f"hook {self.url} answered {response.status_code}")
        try:
            outcome = response.json() if response.content else None
        except ValueError:
            outcome = {"answer": response.text[:1024]}
        return Report(ok=True, outcome=outcome, apply=True)


class Handlers:
    """Step or compensation name → its handler (built-in unless a hook is configured)."""

    def __init__(self, hooks: Mapping[str, Handler] | None = None):
        self.hooks = dict(hooks or {})
        self.builtin = BuiltIn()

    def __getitem__(self, name: str) -> Handler:
        return self.hooks.get(name, self.builtin)

    @classmethod
    def from_setting(cls, text: str, client: httpx.AsyncClient) -> Handlers:
        """From ``TADPOLE_SAGA_HOOKS`` (``{"register_with_mesh": "http://..."}``); one
        breaker per URL."""
        if not text.strip():
            return cls()
        urls = json.loads(text)
        if not isinstance(urls, dict) or not all(isinstance(u, str) for u in urls.values()):
            raise ValueError("TADPOLE_SAGA_HOOKS must be a JSON object of step name → URL")
        breakers = {url: Breaker(url) for url in set(urls.values())}
        return cls({name: HttpHook(url, client, breakers[url]) for name, url in urls.items()})


# ---- fault injection, for tests and benchmarks only ---------------------------------------


class Faults:
    """Faults read from a JSON file (``TADPOLE_TEST_SAGA_FAULTS``), re-read when it changes:
    ``{"rules": [{"step": "register_with_mesh", "action": "fail" | "hang" | "crash",
    "rate": 0.2, "match": {"targetId": "t-1"}}]}``. ``match`` compares the saga's
    params (a dotted path reaches into them: ``requiredCapabilities.test``); ``rate``
    defaults to 1. ``hang`` never reports (the step times out), ``crash`` ends the
    runner process at once, as a kill would."""

    def __init__(self, path: str = ""):
        self.path = path
        self._stamp: float | None = None
        self.rules: list[dict[str, Any]] = []
        self.random = random.Random()

    def _reload(self) -> None:
        try:
            stamp = os.stat(self.path).st_mtime_ns
        except OSError:
            self.rules, self._stamp = [], None
            return
        if stamp != self._stamp:
            with open(self.path) as f:
                self.rules = list(json.load(f).get("rules", []))
            self._stamp = stamp

    def action(self, taken: Taken) -> str | None:
        if not self.path:
            return None
        self._reload()
        for rule in self.rules:
            if rule.get("step") != taken.name:
                continue
            if not all(_param(taken.params, k) == v for k, v in rule.get("match", {}).items()):
                continue
            if self.random.random() < float(rule.get("rate", 1.0)):
                return str(rule["action"])
        return None


def _param(params: Mapping[str, Any], path: str) -> Any:
    value: Any = params
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value
