"""The sagas' steps, their compensations and timeouts (seed 001's ``saga_definitions``).

The agent-spawning saga is orchestrated: its aggregate holds this list and hands
its steps out in order. The mesh-formation saga is choreographed: its aggregate
holds no list; each participant (``sagas/participants.py``) declares its own
step, the step it follows, its timeout and its compensation when it takes it.
The list below is what those participants declare, kept here so the docs, the
API and the benchmark name one set of figures.
"""

from __future__ import annotations

from dataclasses import dataclass

AGENT_SPAWNING, MESH_FORMATION = "agent_spawning", "mesh_formation"

#: Seed 001's ``saga_timeout``: a saga not finished by then is compensated.
SAGA_TIMEOUT_SECONDS = 300.0
#: A compensation that fails this many times aborts its saga (a human must look).
MAX_COMPENSATION_ATTEMPTS = 5
#: The longest timeout a participant may give its step.
MAX_STEP_TIMEOUT_SECONDS = 300.0


@dataclass(frozen=True)
class StepSpec:
    name: str
    compensation: str
    timeout_seconds: float


SPAWN_STEPS: tuple[StepSpec, ...] = (
    StepSpec("reserve_resources", "release_resources", 5.0),
    StepSpec("initialize_agent_state", "cleanup_agent_state", 2.0),
    StepSpec("register_with_mesh", "deregister_from_mesh", 3.0),
)

MESH_STEPS: tuple[StepSpec, ...] = (
    StepSpec("negotiate_capabilities", "reset_capabilities", 10.0),
    StepSpec("establish_connections", "terminate_connections", 5.0),
    StepSpec("synchronize_state", "rollback_state", 15.0),
)
