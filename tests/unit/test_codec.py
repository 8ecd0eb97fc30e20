"""Avro codec and schemas: every event the domain stores encodes, decodes and matches its schema."""

from __future__ import annotations

import io
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer

import schemas.codec as codec_module
from domain.jobs import CompleteTask, CreateJob, FailTask, ReapTasks
from domain.jobs.sweeps import Range, Sweep
from domain.processor import CommandProcessor
from domain.spots import ClaimTasks, Heartbeat, Hello, ReapSpots
from domain.workflows import (
    CancelRun,
    CompensateRun,
    CompleteWorkflowTask,
    Definition,
    FailWorkflowTask,
    PauseRun,
    RegisterWorkflow,
    RenewLease,
    ResumeRun,
    RetryWorkflowTask,
    StartRun,
)
from eventstore.store import StorePort, TadpoleStore, memory_env
from schemas.codec import MARKER, Codec, DecodeError, EventMessage, message_from_event
from schemas.events import (
    AVRO_DIR,
    ENVELOPE_SCHEMA,
    EVENT_CLASSES,
    event_fields,
    event_type,
    rendered_schemas,
)

T0 = datetime(2026, 1, 28, 16, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def stored_messages() -> list[EventMessage]:
    """Drives the processor through a life that emits every kind of event."""
    store = TadpoleStore(memory_env())
    p = CommandProcessor(StorePort(store), max_attempts=3, heartbeat_store_interval=30.0)
    sweep = Sweep(
        "/test/opt.jar",
        "com.test.Main",
        ("PSO", "GA"),
        Range(100, 200, 100),
        Range(10, 10, 10),
        Range(2, 2, 1),
    )
    p.process([CreateJob(sweep, "key-1")], T0)  # Job.Created, TaskBlock.Created
    worker, sleeper = (r.spot_id for r in p.process([Hello("10.0.0.1"), Hello("10.0.0.2")], T0))
    p.process([Heartbeat(worker, "10.0.0.1", 42.5, 1, 8)], at(1))  # Spot.HeartbeatRecorded
    (claim,) = p.process([ClaimTasks(worker, 3)], at(2))  # TaskBlock.Claimed
    done, failed, lost = claim.tasks
    p.process(
        [
            CompleteTask(
                done.task_id, worker, done.fence, 1500, 100, 0.00123, '{"converged":true}'
            ),
            FailTask(failed.task_id, worker, failed.fence, "OutOfMemoryError", True),
        ],
        at(3),
    )  # TaskBlock.Completed, TaskBlock.Failed
    p.process([ReapTasks(5.0)], at(9))  # TaskBlock.Reaped (lease expired)
    (sleeper_claim,) = p.process([ClaimTasks(sleeper, 1)], at(10))
    assert sleeper_claim.tasks
    p.process([Heartbeat(worker)], at(20))
    p.process([ReapSpots(10.0)], at(21))  # Spot.MarkedDown, TaskBlock.Reaped (spot down)
    p.process([Heartbeat(sleeper)], at(22))  # Spot.CameUp
    assert lost.task_id
    workflow_life(p, worker)
    fleet_life(p)
    return [
        message_from_event(store.mapper.to_domain_event(n), n.id)
        for n in store.notifications(0, 1000)
    ]


def workflow_life(p: CommandProcessor, spot: str) -> None:
    """Every workflow event: registered, started, claimed, renewed, failed, retried..."""
    d = Definition.from_dict(
        {
            "namespace": "n",
            "name": "w",
            "version": "1",
            "tasks": [
                {"id": "a", "compensation": {"payload": {}}},
                {"id": "b", "dependsOn": ["a"], "retry": {"maxAttempts": 1}},
            ],
            "compensateOnFailure": False,
        }
    )
    p.process([RegisterWorkflow(d)], at(30))  # Registered, VersionRegistered
    (started,) = p.process([StartRun("n", "w", "r", "{}")], at(30))  # Started
    run = started.instance_id
    (claim,) = p.process([ClaimTasks(spot, 1)], at(31))  # TaskClaimed
    a = claim.tasks[0]
    p.process([RenewLease(a.task_id, spot, a.fence)], at(31))  # LeaseRenewed
    p.process([PauseRun(run)], at(32))  # Paused, StateChanged
    p.process([ResumeRun(run)], at(32))  # Resumed, StateChanged
    p.process([CompleteWorkflowTask(a.task_id, spot, a.fence, "{}")], at(33))  # TaskCompleted
    (claim,) = p.process([ClaimTasks(spot, 1)], at(34))
    b = claim.tasks[0]
    p.process([FailWorkflowTask(b.task_id, spot, b.fence, "no", False)], at(34))  # AttemptFailed
    p.process([RetryWorkflowTask(run, "b", None)], at(35))  # TaskRetried
    p.process([CompensateRun(run, "a")], at(36))  # CompensationStarted
    p.process([CancelRun(run)], at(37))  # Cancelled


def fleet_life(p: CommandProcessor) -> None:
    """Every event of targets, contexts, agents, meshes, sagas and the system."""
    from uuid import UUID, uuid4

    from domain.agents import EvolveAgentCapabilities, TerminateAgent, UpdateAgentPerformance
    from domain.contexts import ModifyContext
    from domain.meshes import DissolveMesh, ImproveMeshPerformance
    from domain.sagas import (
        FinishCompensation,
        FinishStep,
        FireSagaTimers,
        StartMeshFormation,
        StartSpawn,
        StepTaken,
        TakeCompensation,
        TakeStep,
    )
    from domain.system import RecordSystemEvent
    from domain.targets import Limits, UpdateTarget

    def one(command: object, t: float) -> object:
        (result,) = p.process([command], at(t))
        assert not isinstance(result, Exception), result
        return result

    def take(saga: UUID, t: float, **declared: object) -> StepTaken:
        taken = one(TakeStep(saga, "r1", **declared), t)  # type: ignore[arg-type]
        assert isinstance(taken, StepTaken)
        return taken

    def finish(
        saga: UUID, taken: StepTaken, t: float, ok: bool = True, final: bool = False
    ) -> None:
        one(FinishStep(saga, taken.step, "r1", taken.fence, ok, None, "no", True, final), t)

    def compensate(saga: UUID, t: float, ok: bool = True) -> None:
        taken = one(TakeCompensation(saga, "r1"), t)
        assert isinstance(taken, StepTaken)
        one(FinishCompensation(saga, taken.step, "r1", taken.fence, ok, None, "no", True), t)

    limits = Limits(1000, 1 << 30, 10)
    one(UpdateTarget("t1", "READY", {"gpu": "a100"}, limits), 40)  # Target.Registered
    one(UpdateTarget("t1", "READY", {"gpu": "a100", "x": "1"}, limits), 40)  # Target.Updated
    one(ModifyContext("c1", ("org",), {"a": "1"}), 40)  # Context.Created
    one(ModifyContext("c1", ("org", "org/t"), {"a": "1"}), 40)  # Context.Modified
    steps = [
        ("negotiate_capabilities", None, "reset_capabilities"),
        ("establish_connections", "negotiate_capabilities", "terminate_connections"),
        ("synchronize_state", "establish_connections", "rollback_state"),
    ]

    def participant(n: int) -> dict[str, object]:
        step, after, compensation = steps[n]
        return {"step": step, "after": after, "timeout_seconds": 5.0, "compensation": compensation}

    mesh_saga, mesh = uuid4(), uuid4()
    one(StartMeshFormation(mesh_saga, mesh, "full", {"gpu": "a100"}, 1, 3), 41)
    for n in range(3):  # MeshFormation.StepStarted, StepSucceeded, Completed; Mesh.Formed
        finish(mesh_saga, take(mesh_saga, 41, **participant(n)), 41, final=n == 2)
    spawned, agent = uuid4(), uuid4()
    one(StartSpawn(spawned, agent, "t1", mesh, {"gpu": "a100"}, 100, 1000), 42)
    for _ in range(3):  # Target.Reserved, Agent.Spawned, MeshJoined, Mesh.TopologyChanged
        finish(spawned, take(spawned, 42), 42)
    one(UpdateAgentPerformance(agent, {"score": 0.9}), 43)  # Agent.PerformanceUpdated
    one(EvolveAgentCapabilities(agent, {"gpu": "a100", "fp8": "yes"}), 43)  # CapabilityEvolved
    one(ImproveMeshPerformance(mesh, {"latency_ms": 3.5}), 43)  # Mesh.PerformanceImproved
    one(TerminateAgent(agent, "done"), 44)  # Agent.MeshLeft, Terminated; Target.Released
    # A spawn failing at its last step, one compensation failing once: StepFailed,
    # CompensationStarted, CompensationTaken, CompensationFailed, StepCompensated, Compensated.
    failing = uuid4()
    one(StartSpawn(failing, uuid4(), "t1", None, {}, 100, 1000), 45)
    finish(failing, take(failing, 45), 45)
    finish(failing, take(failing, 45), 45)
    finish(failing, take(failing, 45), 45, ok=False)
    compensate(failing, 45, ok=False)
    compensate(failing, 50)
    compensate(failing, 50)
    # A spawn whose step times out and whose compensation keeps failing: StepTimedOut,
    # Aborted, and the system's EmergencyStateActivated.
    stuck = uuid4()
    one(StartSpawn(stuck, uuid4(), "t1", None, {}, 100, 1000), 60)
    take(stuck, 60)
    one(FireSagaTimers(), 70)
    for n in range(5):
        compensate(stuck, 80 + 20 * n, ok=False)
    # Mesh formations: one failing after a step (compensated), one timing out and aborting.
    compensated, aborted = uuid4(), uuid4()
    for saga in (compensated, aborted):
        one(StartMeshFormation(saga, uuid4(), "ring", {}, 0, 2), 200)
        finish(saga, take(saga, 200, **participant(0)), 200)
    finish(compensated, take(compensated, 200, **participant(1)), 200, ok=False)
    compensate(compensated, 200)
    take(aborted, 200, **participant(1))
    one(FireSagaTimers(), 210)
    for n in range(5):
        compensate(aborted, 220 + 20 * n, ok=False)
    one(DissolveMesh(mesh, "done"), 400)  # Mesh.Dissolved
    for kind in ("system_configuration_changed", "optimization_cycle_completed"):
        one(RecordSystemEvent(kind, "by hand", {"k": 1}), 400)
    one(RecordSystemEvent("recovery_process_initiated", "runner restarted", {}), 400)


@pytest.fixture(scope="module")
def messages() -> list[EventMessage]:
    return stored_messages()


@pytest.fixture(scope="module")
def codec() -> Codec:
    return Codec()


def drift(directory: Path) -> dict[str, str]:
    """File name → what is wrong with it, comparing ``directory`` to the event classes."""
    wrong: dict[str, str] = {}
    rendered = rendered_schemas()
    on_disk = {p.name for p in directory.glob("*.avsc")}
    for name in sorted(on_disk - rendered.keys()):
        wrong[name] = "no event class"
    for name, text in rendered.items():
        path = directory / name
        if not path.exists():
            wrong[name] = "missing"
        elif path.read_text() != text:
            wrong[name] = "differs"
    return wrong


# ---- every event type, round-tripped -------------------------------------------------


def test_a_realistic_scenario_emits_every_event_class(messages: list[EventMessage]) -> None:
    assert {m.type for m in messages} == {event_type(c) for c in EVENT_CLASSES}


def test_every_stored_event_round_trips_through_the_codec(
    codec: Codec, messages: list[EventMessage]
) -> None:
    for message in messages:
        back = codec.decode(codec.encode(message))
        assert back.type == message.type
        assert back.data == message.data, message.type
        assert (back.aggregate_id, back.version, back.position) == (
            message.aggregate_id,
            message.version,
            message.position,
        )
        assert back.timestamp == message.timestamp
        assert (back.message_id, back.correlation_id) == (
            message.message_id,
            message.correlation_id,
        )
        assert back.aggregate_type == message.type.split(".")[0]


def test_message_data_holds_exactly_the_event_class_fields(messages: list[EventMessage]) -> None:
    by_type = {event_type(c): c for c in EVENT_CLASSES}
    for message in messages:
        assert set(message.data) == set(event_fields(by_type[message.type]))


def test_payload_values_survive_decoding_with_their_types(
    codec: Codec, messages: list[EventMessage]
) -> None:
    (completed,) = [m for m in messages if m.type == "TaskBlock.Completed"]
    back = codec.decode(codec.encode(completed)).data
    assert back["fopts"] == [0.00123]
    assert back["results"] == ['{"converged":true}']
    assert back["at"] == at(3)
    (job,) = [m for m in messages if m.type == "Job.Created"]
    assert codec.decode(codec.encode(job)).data["idempotency_key"] == "key-1"


def test_positions_are_the_store_notification_ids(messages: list[EventMessage]) -> None:
    assert [m.position for m in messages] == list(range(1, len(messages) + 1))


# ---- schemas on disk -----------------------------------------------------------------


def test_committed_schemas_equal_the_rendered_schemas() -> None:
    assert drift(AVRO_DIR) == {}


def test_rendered_schemas_cover_the_envelope_and_every_event_class() -> None:
    assert set(rendered_schemas()) == {"Envelope.avsc"} | {
        f"{event_type(c)}.avsc" for c in EVENT_CLASSES
    }
    assert json.loads(rendered_schemas()["Envelope.avsc"]) == ENVELOPE_SCHEMA


def _copy_with_field_removed(tmp_path: Path, schema: str, field: str) -> Path:
    copy = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, copy)
    path = copy / f"{schema}.avsc"
    data = json.loads(path.read_text())
    data["fields"] = [f for f in data["fields"] if f["name"] != field]
    path.write_text(json.dumps(data, indent=2) + "\n")
    return copy


def test_drift_check_finds_a_schema_that_disagrees_with_its_class(tmp_path: Path) -> None:
    copy = _copy_with_field_removed(tmp_path, "TaskBlock.Claimed", "fences")
    assert drift(copy) == {"TaskBlock.Claimed.avsc": "differs"}
    (copy / "TaskBlock.Reaped.avsc").unlink()
    (copy / "Task.Renamed.avsc").write_text("{}")
    assert drift(copy) == {
        "TaskBlock.Claimed.avsc": "differs",
        "TaskBlock.Reaped.avsc": "missing",
        "Task.Renamed.avsc": "no event class",
    }


def test_a_codec_over_a_disagreeing_schema_loses_the_field(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    codec: Codec,
    messages: list[EventMessage],
) -> None:
    copy = _copy_with_field_removed(tmp_path, "TaskBlock.Claimed", "fences")
    monkeypatch.setattr(codec_module, "AVRO_DIR", copy)
    drifted = Codec()
    (claimed, *_) = [m for m in messages if m.type == "TaskBlock.Claimed"]
    back = drifted.decode(drifted.encode(claimed))
    assert "fences" not in back.data
    assert back.data != claimed.data
    # And the committed codec cannot read what the drifted one wrote.
    with pytest.raises(DecodeError, match="no schema has fingerprint"):
        codec.decode(drifted.encode(claimed))


def test_a_schema_requiring_a_field_the_class_lacks_fails_to_encode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, messages: list[EventMessage]
) -> None:
    copy = tmp_path / "avro"
    shutil.copytree(AVRO_DIR, copy)
    path = copy / "Spot.CameUp.avsc"
    data = json.loads(path.read_text())
    data["fields"].append({"name": "reason", "type": "string"})
    path.write_text(json.dumps(data))
    monkeypatch.setattr(codec_module, "AVRO_DIR", copy)
    (came_up,) = [m for m in messages if m.type == "Spot.CameUp"]
    with pytest.raises((ValueError, TypeError, KeyError)):
        Codec().encode(came_up)


# ---- undecodable bytes -----------------------------------------------------------------


def _envelope(codec: Codec, data: bytes) -> dict[str, Any]:
    envelope = schemaless_reader(io.BytesIO(data), parse_schema(ENVELOPE_SCHEMA))
    assert isinstance(envelope, dict)
    return envelope


def _rewrap(envelope: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    schemaless_writer(out, parse_schema(ENVELOPE_SCHEMA), envelope)
    return out.getvalue()


@pytest.mark.parametrize("data", [b"", b"\xff", b"garbage bytes that are not avro", b"\x00" * 3])
def test_garbage_bytes_raise_decode_error(codec: Codec, data: bytes) -> None:
    with pytest.raises(DecodeError):
        codec.decode(data)


def test_truncated_bytes_raise_decode_error(codec: Codec, messages: list[EventMessage]) -> None:
    data = codec.encode(messages[0])
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(DecodeError):
            codec.decode(data[:cut])


def test_a_truncated_payload_raises_decode_error(
    codec: Codec, messages: list[EventMessage]
) -> None:
    (claimed, *_) = [m for m in messages if m.type == "TaskBlock.Claimed"]
    envelope = _envelope(codec, codec.encode(claimed))
    envelope["payload"] = envelope["payload"][:-3]
    with pytest.raises(DecodeError):
        codec.decode(_rewrap(envelope))


def test_an_unknown_fingerprint_raises_decode_error(
    codec: Codec, messages: list[EventMessage]
) -> None:
    envelope = _envelope(codec, codec.encode(messages[0]))
    payload = envelope["payload"]
    envelope["payload"] = MARKER + b"\x00" * 8 + payload[10:]
    with pytest.raises(DecodeError, match="no schema has fingerprint"):
        codec.decode(_rewrap(envelope))


def test_a_payload_without_the_single_object_marker_raises_decode_error(
    codec: Codec, messages: list[EventMessage]
) -> None:
    envelope = _envelope(codec, codec.encode(messages[0]))
    envelope["payload"] = envelope["payload"][2:]
    with pytest.raises(DecodeError, match="single-object"):
        codec.decode(_rewrap(envelope))


def test_a_payload_of_another_type_than_the_envelope_says_raises_decode_error(
    codec: Codec, messages: list[EventMessage]
) -> None:
    (job,) = [m for m in messages if m.type == "Job.Created"]
    envelope = _envelope(codec, codec.encode(job))
    envelope["message_type"] = "TaskBlock.Created"
    with pytest.raises(
        DecodeError, match=r"envelope says TaskBlock\.Created, payload is Job\.Created"
    ):
        codec.decode(_rewrap(envelope))


def test_decode_error_is_a_value_error() -> None:
    assert issubclass(DecodeError, ValueError)
