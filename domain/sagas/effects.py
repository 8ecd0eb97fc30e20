"""What the built-in step handlers do: changes to Tadpole's own aggregates.

A built-in step's work is a change to an agent, a mesh or a target, which only
the writer may make; so the saga runner's built-in handler asks the writer to
make it, and the writer makes it in the same batch that records the step's
success (``FinishStep`` with ``apply``): a step's effect and its record are one
append, and a step that timed out can no longer take effect. The rules stay in
the aggregates (a reservation in :class:`~domain.targets.target.Target`, a
membership in :class:`~domain.meshes.mesh.Mesh` and
:class:`~domain.agents.agent.Agent`); an effect the aggregate refuses fails the
step with the aggregate's message.

Compensations are idempotent: undoing what was never done changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from domain.agents.agent import Agent, AgentError
from domain.ids import UnknownIdError, parse_agent_id, parse_mesh_id, target_uuid
from domain.meshes.mesh import Mesh, MeshError
from domain.processor import UnitOfWork
from domain.sagas.saga import Saga
from domain.targets.target import Target, TargetError

Outcome = dict[str, Any]
Effect = Callable[[UnitOfWork, Saga], Outcome]


class EffectRefused(RuntimeError):
    """The aggregate refused the step's change; the message says why."""


def _target(uow: UnitOfWork, name: str) -> Target | None:
    try:
        return uow.get(target_uuid(name), Target)
    except UnknownIdError:
        return None


def _agent(uow: UnitOfWork, saga: Saga) -> Agent | None:
    return uow.get(parse_agent_id(saga.params["agentId"]), Agent)


def _mesh(uow: UnitOfWork, text: str) -> Mesh | None:
    return uow.get(parse_mesh_id(text), Mesh)


# ---- agent spawning ---------------------------------------------------------------------


def reserve_resources(uow: UnitOfWork, saga: Saga) -> Outcome:
    p = saga.params
    target = _target(uow, p["targetId"])
    if target is None:
        raise EffectRefused(f"target {p['targetId']} does not exist")
    r = p["resources"]
    try:
        target.reserve(
            p["agentId"], saga.public_id, r["cpu_millicores"], r["memory_bytes"], uow.now
        )
    except TargetError as error:
        raise EffectRefused(str(error)) from None
    uow.add(target)
    return {"targetId": target.target_id, **r}


def release_resources(uow: UnitOfWork, saga: Saga) -> Outcome:
    p = saga.params
    target = _target(uow, p["targetId"])
    released = target is not None and target.release(p["agentId"], uow.now)
    if target is not None and released:
        uow.add(target)
    return {"released": released}


def initialize_agent_state(uow: UnitOfWork, saga: Saga) -> Outcome:
    p = saga.params
    agent = _agent(uow, saga)
    if agent is None:
        r = p["resources"]
        agent = Agent.spawn(
            parse_agent_id(p["agentId"]),
            p["targetId"],
            p["capabilities"],
            r["cpu_millicores"],
            r["memory_bytes"],
            saga.public_id,
            uow.now,
        )
        uow.add(agent)
    elif not agent.active:
        raise EffectRefused("agent is terminated")
    return {"agentId": p["agentId"], "state": agent.state}


def cleanup_agent_state(uow: UnitOfWork, saga: Saga) -> Outcome:
    agent = _agent(uow, saga)
    if agent is None:
        return {"terminated": False}
    mesh = agent.mesh
    if mesh is not None:  # a membership the saga did not record (it timed out): undo it too
        deregister(uow, agent, mesh)
    terminated = agent.terminate("its spawn saga was compensated", uow.now)
    uow.add(agent)
    return {"terminated": terminated}


def register_with_mesh(uow: UnitOfWork, saga: Saga) -> Outcome:
    p = saga.params
    if p.get("meshId") is None:
        return {"meshId": None}
    mesh = _mesh(uow, p["meshId"])
    agent = _agent(uow, saga)
    if mesh is None:
        raise EffectRefused(f"mesh {p['meshId']} does not exist (or is still being formed)")
    if agent is None:
        raise EffectRefused("agent was not initialized")
    try:
        if agent.check_join(p["meshId"]) and mesh.check_join(p["agentId"], agent.capabilities):
            mesh.join(p["agentId"], agent.capabilities, uow.now)
            agent.join(p["meshId"], uow.now)
    except (AgentError, MeshError) as error:
        raise EffectRefused(str(error)) from None
    uow.add(mesh)
    uow.add(agent)
    return {"meshId": p["meshId"], "members": len(mesh.members)}


def deregister(uow: UnitOfWork, agent: Agent, mesh_text: str) -> bool:
    """``agent`` leaves ``mesh_text`` (undoing a join: never refused); whether it was in."""
    mesh = _mesh(uow, mesh_text)
    left = mesh is not None and mesh.leave(agent.public_id, uow.now, undo=True)
    if mesh is not None and left:
        uow.add(mesh)
    if agent.leave(mesh_text, uow.now):
        uow.add(agent)
    return left


def deregister_from_mesh(uow: UnitOfWork, saga: Saga) -> Outcome:
    p = saga.params
    agent = _agent(uow, saga)
    if p.get("meshId") is None or agent is None:
        return {"left": False}
    return {"left": deregister(uow, agent, p["meshId"])}


# ---- mesh formation -----------------------------------------------------------------------


def negotiate_capabilities(uow: UnitOfWork, saga: Saga) -> Outcome:
    """The capabilities every member must have, as the mesh will require them."""
    return {"requiredCapabilities": saga.params["requiredCapabilities"]}


def establish_connections(uow: UnitOfWork, saga: Saga) -> Outcome:
    """The links the topology plans between ``maxMembers`` members."""
    n, topology = saga.params["maxMembers"], saga.params["topology"]
    links = n * (n - 1) // 2 if topology == "full" else (n if topology == "ring" else n - 1)
    return {"topology": topology, "plannedConnections": max(0, links)}


def synchronize_state(uow: UnitOfWork, saga: Saga) -> Outcome:
    """The mesh comes into being (``mesh_formed``), empty, waiting for its members."""
    p = saga.params
    uuid = parse_mesh_id(p["meshId"])
    if uow.get(uuid, Mesh) is None:
        mesh = Mesh.form(
            uuid,
            p["topology"],
            p["requiredCapabilities"],
            p["minMembers"],
            p["maxMembers"],
            saga.public_id,
            uow.now,
        )
        uow.add(mesh)
    return {"meshId": p["meshId"]}


def rollback_state(uow: UnitOfWork, saga: Saga) -> Outcome:
    mesh = _mesh(uow, saga.params["meshId"])
    if mesh is None:
        return {"dissolved": False}
    for member in mesh.dissolve("its formation saga was compensated", uow.now):
        agent = uow.get(parse_agent_id(member), Agent)
        if agent is not None and agent.leave(saga.params["meshId"], uow.now):
            uow.add(agent)
    uow.add(mesh)
    return {"dissolved": True}


def nothing_to_undo(uow: UnitOfWork, saga: Saga) -> Outcome:
    """reset_capabilities, terminate_connections: their steps changed nothing stored."""
    return {}


#: Step or compensation name → its built-in effect.
EFFECTS: dict[str, Effect] = {
    "reserve_resources": reserve_resources,
    "release_resources": release_resources,
    "initialize_agent_state": initialize_agent_state,
    "cleanup_agent_state": cleanup_agent_state,
    "register_with_mesh": register_with_mesh,
    "deregister_from_mesh": deregister_from_mesh,
    "negotiate_capabilities": negotiate_capabilities,
    "reset_capabilities": nothing_to_undo,
    "establish_connections": establish_connections,
    "terminate_connections": nothing_to_undo,
    "synchronize_state": synchronize_state,
    "rollback_state": rollback_state,
}
