"""Meshes (seed 001): agents joined under a topology, required capabilities and size bounds.

A low-rate family: nothing is open work; meshes are loaded on demand.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from domain.agents.agent import Agent
from domain.audit import whole
from domain.family import ConflictError, Family, NotFoundError, Ok, Result
from domain.ids import agent_id, mesh_id, parse_agent_id, parse_mesh_id
from domain.lowrate import LowRateWork, low_rate
from domain.meshes.commands import DissolveMesh, ImproveMeshPerformance, LeaveMesh
from domain.meshes.mesh import ACTIVE, DISSOLVED, PENDING, TOPOLOGIES, Mesh, MeshError


class MeshesWork(LowRateWork):
    def _mesh(self, uuid: UUID) -> Mesh | NotFoundError:
        mesh = self.uow.get(uuid, Mesh)
        return mesh if mesh is not None else NotFoundError("mesh not found")

    def improve(self, c: ImproveMeshPerformance) -> Result:
        mesh = self._mesh(c.mesh)
        if isinstance(mesh, NotFoundError):
            return mesh
        try:
            mesh.improve(c.metrics, self.uow.now)
        except MeshError as error:
            return ConflictError(str(error))
        self.uow.add(mesh)
        return Ok()

    def leave(self, c: LeaveMesh) -> Result:
        mesh = self._mesh(c.mesh)
        if isinstance(mesh, NotFoundError):
            return mesh
        member = agent_id(c.agent)
        if member not in mesh.members:
            return NotFoundError(f"{member} is not a member of this mesh")
        try:
            mesh.leave(member, self.uow.now)
        except MeshError as error:
            return ConflictError(str(error))
        agent = self.uow.get(c.agent, Agent)
        if agent is not None and agent.leave(mesh_public(mesh), self.uow.now):
            self.uow.add(agent)
        self.uow.add(mesh)
        return Ok()

    def dissolve(self, c: DissolveMesh) -> Result:
        mesh = self._mesh(c.mesh)
        if isinstance(mesh, NotFoundError):
            return mesh
        for member in mesh.dissolve(c.reason, self.uow.now):
            agent = self.uow.get(parse_agent_id(member), Agent)
            if agent is not None and agent.leave(mesh_public(mesh), self.uow.now):
                self.uow.add(agent)
        self.uow.add(mesh)
        return Ok()


def mesh_public(mesh: Mesh) -> str:
    return mesh_id(mesh.id)


def _reads(c: ImproveMeshPerformance | LeaveMesh | DissolveMesh) -> Iterable[UUID]:
    return (c.mesh, c.agent) if isinstance(c, LeaveMesh) else (c.mesh,)


FAMILY = Family(
    name="meshes",
    events=(Mesh.Formed, Mesh.TopologyChanged, Mesh.PerformanceImproved, Mesh.Dissolved),
    topic="mesh_coordination",
    topics={Mesh.PerformanceImproved: "performance_metrics"},
    handlers={
        ImproveMeshPerformance: MeshesWork.improve,
        LeaveMesh: MeshesWork.leave,
        DissolveMesh: MeshesWork.dissolve,
    },
    state=low_rate(MeshesWork),
    audit={"mesh": whole(parse_mesh_id, Mesh)},
    reads=dict.fromkeys((ImproveMeshPerformance, LeaveMesh, DissolveMesh), _reads),
)

__all__ = [
    "ACTIVE",
    "DISSOLVED",
    "FAMILY",
    "PENDING",
    "TOPOLOGIES",
    "DissolveMesh",
    "ImproveMeshPerformance",
    "LeaveMesh",
    "Mesh",
    "MeshError",
]
