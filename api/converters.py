"""Falcon route converters: a path's job or task id is parsed before a responder runs.

An id that is not one of ours is a 404 with the message seed 003's clients
know (``job not found``); one with a value no id may hold (a NUL) is a 400, as
everywhere else (:func:`api.validation.scalar_fits`).
"""

from __future__ import annotations

from uuid import UUID

import falcon
import falcon.routing

from api import validation as v
from domain.ids import (
    UnknownIdError,
    parse_agent_id,
    parse_job_id,
    parse_mesh_id,
    parse_saga_id,
    parse_task_id,
)
from domain.workflows.ids import parse_instance_id, parse_workflow_task_id


class JobId(falcon.routing.BaseConverter):
    """``{job_id:job}``: the job's aggregate id."""

    def convert(self, value: str) -> UUID:
        v.scalar_fits(value, "job_id")
        try:
            return parse_job_id(value)
        except UnknownIdError:
            raise falcon.HTTPNotFound(description="job not found") from None


class TaskId(falcon.routing.BaseConverter):
    """``{task_id:task}``: a job's or a workflow's task id, checked to be one (the text
    itself is passed on)."""

    def convert(self, value: str) -> str:
        v.scalar_fits(value, "task_id")
        for parse in (parse_task_id, parse_workflow_task_id):
            try:
                parse(value)
            except UnknownIdError:
                continue
            return value
        raise falcon.HTTPNotFound(description="task not found")


class InstanceId(falcon.routing.BaseConverter):
    """``{instance:instance}``: a workflow run's instance id (a UUID)."""

    def convert(self, value: str) -> UUID:
        v.scalar_fits(value, "instance")
        try:
            return parse_instance_id(value)
        except UnknownIdError:
            raise falcon.HTTPNotFound(description="workflow run not found") from None


class _Prefixed(falcon.routing.BaseConverter):
    """An ``agent-``, ``mesh-`` or ``saga-`` id: its aggregate id, or 404."""

    name = ""

    def convert(self, value: str) -> UUID:
        v.scalar_fits(value, f"{self.name}_id")
        try:
            return self.parse(value)
        except UnknownIdError:
            raise falcon.HTTPNotFound(description=f"{self.name} not found") from None

    @staticmethod
    def parse(text: str) -> UUID:
        raise NotImplementedError


class AgentId(_Prefixed):
    name, parse = "agent", staticmethod(parse_agent_id)


class MeshId(_Prefixed):
    name, parse = "mesh", staticmethod(parse_mesh_id)


class SagaId(_Prefixed):
    name, parse = "saga", staticmethod(parse_saga_id)


CONVERTERS: dict[str, type[falcon.routing.BaseConverter]] = {
    "job": JobId,
    "task": TaskId,
    "instance": InstanceId,
    "agent": AgentId,
    "mesh": MeshId,
    "saga": SagaId,
}
