"""Agents (seed 001): spawned by the agent-spawning saga, placed on a target, in at most
one mesh.

A low-rate family: nothing is open work; agents are loaded on demand.
"""

from __future__ import annotations

from collections.abc import Iterable
from uuid import UUID

from domain.agents.agent import ACTIVE, TERMINATED, Agent, AgentError
from domain.agents.commands import EvolveAgentCapabilities, TerminateAgent, UpdateAgentPerformance
from domain.audit import whole
from domain.family import ConflictError, Family, NotFoundError, Ok, Result
from domain.ids import parse_agent_id, parse_mesh_id, target_uuid
from domain.lowrate import LowRateWork, low_rate
from domain.meshes.mesh import Mesh
from domain.targets.target import Target


class AgentsWork(LowRateWork):
    def _agent(self, uuid: UUID) -> Agent | NotFoundError:
        agent = self.uow.get(uuid, Agent)
        return agent if agent is not None else NotFoundError("agent not found")

    def performance(self, c: UpdateAgentPerformance) -> Result:
        agent = self._agent(c.agent)
        if isinstance(agent, NotFoundError):
            return agent
        try:
            agent.update_performance(c.metrics, self.uow.now)
        except AgentError as error:
            return ConflictError(str(error))
        self.uow.add(agent)
        return Ok()

    def evolve(self, c: EvolveAgentCapabilities) -> Result:
        """New capabilities; refused if the agent's mesh requires one it would lose."""
        agent = self._agent(c.agent)
        if isinstance(agent, NotFoundError):
            return agent
        if agent.mesh is not None:
            mesh = self.uow.get(parse_mesh_id(agent.mesh), Mesh)
            lost = (
                {k: v for k, v in mesh.required.items() if c.capabilities.get(k) != v}
                if mesh is not None
                else {}
            )
            if lost:
                wanted = ", ".join(f"{k}={v}" for k, v in sorted(lost.items()))
                return ConflictError(
                    f"agent's mesh {agent.mesh} requires capabilities it would lose: {wanted}"
                )
        try:
            if agent.evolve(c.capabilities, self.uow.now):
                self.uow.add(agent)
        except AgentError as error:
            return ConflictError(str(error))
        return Ok()

    def terminate(self, c: TerminateAgent) -> Result:
        agent = self._agent(c.agent)
        if isinstance(agent, NotFoundError):
            return agent
        if not agent.active:
            return Ok()
        if agent.mesh is not None:
            mesh = self.uow.get(parse_mesh_id(agent.mesh), Mesh)
            if mesh is not None and mesh.leave(agent.public_id, self.uow.now, undo=True):
                self.uow.add(mesh)
            agent.leave(agent.mesh, self.uow.now)
        target = self.uow.get(target_uuid(agent.target_id), Target)
        if target is not None and target.release(agent.public_id, self.uow.now):
            self.uow.add(target)
        agent.terminate(c.reason, self.uow.now)
        self.uow.add(agent)
        return Ok()


def _reads(c: UpdateAgentPerformance | EvolveAgentCapabilities | TerminateAgent) -> Iterable[UUID]:
    return (c.agent,)


FAMILY = Family(
    name="agents",
    events=(
        Agent.Spawned,
        Agent.PerformanceUpdated,
        Agent.CapabilityEvolved,
        Agent.MeshJoined,
        Agent.MeshLeft,
        Agent.Terminated,
    ),
    topic="agent_lifecycle",
    topics={Agent.PerformanceUpdated: "performance_metrics"},
    handlers={
        UpdateAgentPerformance: AgentsWork.performance,
        EvolveAgentCapabilities: AgentsWork.evolve,
        TerminateAgent: AgentsWork.terminate,
    },
    state=low_rate(AgentsWork),
    audit={"agent": whole(parse_agent_id, Agent)},
    reads=dict.fromkeys((UpdateAgentPerformance, EvolveAgentCapabilities, TerminateAgent), _reads),
)

__all__ = [
    "ACTIVE",
    "FAMILY",
    "TERMINATED",
    "Agent",
    "AgentError",
    "EvolveAgentCapabilities",
    "TerminateAgent",
    "UpdateAgentPerformance",
]
