"""The saga runner's side of the API: take a step or a compensation, report it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx


class Refused(Exception):
    """The writer refused a take or a report (409: someone else drives it, or it is over)."""


@dataclass(frozen=True)
class Taken:
    """A step or compensation this runner now holds (the API's ``StepTaken``)."""

    saga_id: str
    kind: str
    step: str
    compensation: str
    fence: int
    deadline: datetime
    params: dict[str, Any]
    outcome: Any
    is_compensation: bool

    @property
    def name(self) -> str:
        """The name its handler is found by: the step's, or its compensation's."""
        return self.compensation if self.is_compensation else self.step


#: Requests in flight at once, each on its own kept-alive connection. More sagas than
#: this wait here: httpcore's pool looks over every queued request whenever a
#: connection frees, which with hundreds queued took the runner's whole CPU.
CONNECTIONS = 16


class SagaApi:
    """The ``/internal/v1/sagas`` routes, and the saga queries, over one HTTP client."""

    def __init__(self, base_url: str, driver: str, agent_key: str = "", timeout: float = 10.0):
        headers = {"X-Orhestra-Key": agent_key} if agent_key else {}
        # Idle connections are dropped before the server drops its side (uvicorn: 5 s), so
        # a request is never sent on a connection the server is closing.
        limits = httpx.Limits(
            max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS, keepalive_expiry=2.0
        )
        self.http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, limits=limits
        )
        self.slots = asyncio.Semaphore(CONNECTIONS)
        self.driver = driver

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.slots:
            response = await self.http.post(path, json={"driver": self.driver, **body})
        if response.status_code in (404, 409):
            raise Refused(response.json().get("error", response.text))
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found

    async def take_step(self, saga: str, **declared: Any) -> Taken:
        body = await self._post(f"/internal/v1/sagas/{saga}/steps/take", declared)
        return taken_from(body, compensation=False)

    async def finish_step(self, taken: Taken, **report: Any) -> dict[str, Any]:
        path = f"/internal/v1/sagas/{taken.saga_id}/steps/{taken.step}/finish"
        return await self._post(path, {"fenceToken": taken.fence, **report})

    async def take_compensation(self, saga: str, step: str | None = None) -> Taken:
        body = await self._post(
            f"/internal/v1/sagas/{saga}/compensations/take", {"step": step} if step else {}
        )
        return taken_from(body, compensation=True)

    async def finish_compensation(self, taken: Taken, **report: Any) -> dict[str, Any]:
        path = f"/internal/v1/sagas/{taken.saga_id}/compensations/{taken.step}/finish"
        return await self._post(path, {"fenceToken": taken.fence, **report})

    async def record_system_event(self, kind: str, reason: str, detail: dict[str, Any]) -> None:
        async with self.slots:
            response = await self.http.post(
                "/api/v1/system/events", json={"type": kind, "reason": reason, "detail": detail}
            )
        response.raise_for_status()

    async def saga(self, saga: str) -> dict[str, Any] | None:
        async with self.slots:
            response = await self.http.get(f"/api/v1/sagas/{saga}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        found: dict[str, Any] = response.json()
        return found

    async def open_sagas(self) -> list[dict[str, Any]]:
        async with self.slots:
            response = await self.http.get(
                "/api/v1/sagas", params={"state": "RUNNING,COMPENSATING", "limit": 1000}
            )
        response.raise_for_status()
        found: list[dict[str, Any]] = response.json()["sagas"]
        return found


def taken_from(body: dict[str, Any], compensation: bool) -> Taken:
    """A ``StepTaken`` answer (or a report's ``next``) as a :class:`Taken`."""
    return Taken(
        body["sagaId"],
        body["kind"],
        body["step"],
        body["compensation"],
        body["fenceToken"],
        datetime.fromisoformat(body["deadline"]),
        body["params"],
        body.get("outcome"),
        compensation,
    )
