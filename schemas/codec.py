"""Avro codec: domain events ⇄ the seed 001 envelope with a single-object-encoded payload.

The payload starts with the Avro single-object marker and the CRC-64-AVRO
fingerprint of its writer's schema, so a reader can always find that schema
(here, in ``schemas/avro/``). Bytes that do not decode raise :class:`DecodeError`;
consumers send them to a dead-letter topic.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from domain.registry import event_type
from schemas.events import AVRO_DIR, EVENT_CLASSES, event_fields

MARKER = b"\xc3\x01"
SOURCE_SYSTEM = "tadpole"
SCHEMA_VERSION = "1"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class DecodeError(ValueError):
    """Bytes that are not a Tadpole envelope with a known, decodable payload."""


@dataclass(frozen=True)
class EventMessage:
    """One stored event as readers see it, whether it came from Kafka or the store."""

    type: str
    aggregate_id: UUID
    version: int
    position: int
    timestamp: datetime
    data: dict[str, Any]
    message_id: str = field(default_factory=lambda: str(uuid4()))
    correlation_id: str = ""

    @property
    def aggregate_type(self) -> str:
        return self.type.split(".", 1)[0]


def message_from_event(event: Any, position: int) -> EventMessage:
    """The :class:`EventMessage` of a domain event stored at ``position``."""
    kind = event_type(type(event))
    data = {name: getattr(event, name) for name in event_fields(type(event))}
    return EventMessage(
        type=kind,
        aggregate_id=event.originator_id,
        version=event.originator_version,
        position=position,
        timestamp=event.timestamp,
        data=data,
        message_id=str(uuid4()),
        correlation_id=str(event.originator_id),
    )


class Codec:
    """Encodes and decodes envelopes with the committed schemas of ``schemas/avro``."""

    def __init__(self) -> None:
        self._envelope = parse_schema(self._load("Envelope"))
        self._by_type: dict[str, tuple[Any, bytes]] = {}
        self._by_fingerprint: dict[bytes, tuple[str, Any]] = {}
        for cls in EVENT_CLASSES:
            kind = event_type(cls)
            raw = self._load(kind)
            parsed = parse_schema(raw)
            fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
            self._by_type[kind] = (parsed, fp)
            self._by_fingerprint[fp] = (kind, parsed)

    @staticmethod
    def _load(name: str) -> Any:
        return json.loads((AVRO_DIR / f"{name}.avsc").read_text())

    def encode(self, message: EventMessage) -> bytes:
        schema, fp = self._by_type[message.type]
        body = io.BytesIO()
        body.write(MARKER + fp)
        schemaless_writer(body, schema, message.data)
        envelope: dict[str, Any] = {
            "message_id": message.message_id,
            "correlation_id": message.correlation_id,
            "causation_id": None,
            "timestamp": (message.timestamp - EPOCH) // timedelta(microseconds=1) * 1000,
            "source_system": SOURCE_SYSTEM,
            "destination_system": None,
            "message_type": message.type,
            "schema_version": SCHEMA_VERSION,
            "aggregate_type": message.aggregate_type,
            "aggregate_id": str(message.aggregate_id),
            "aggregate_version": message.version,
            "position": message.position,
            "metadata": {},
            "payload": body.getvalue(),
        }
        out = io.BytesIO()
        schemaless_writer(out, self._envelope, envelope)
        return out.getvalue()

    def decode(self, data: bytes) -> EventMessage:
        try:
            envelope = schemaless_reader(io.BytesIO(data), self._envelope)
            assert isinstance(envelope, dict)
            payload: bytes = envelope["payload"]
            if payload[:2] != MARKER:
                raise DecodeError("payload is not Avro single-object encoded")
            found = self._by_fingerprint.get(payload[2:10])
            if found is None:
                raise DecodeError(f"no schema has fingerprint {payload[2:10].hex()}")
            kind, schema = found
            if kind != envelope["message_type"]:
                raise DecodeError(f"envelope says {envelope['message_type']}, payload is {kind}")
            record = schemaless_reader(io.BytesIO(payload[10:]), schema)
            assert isinstance(record, dict)
            return EventMessage(
                type=kind,
                aggregate_id=UUID(envelope["aggregate_id"]),
                version=envelope["aggregate_version"],
                position=envelope["position"],
                timestamp=EPOCH + timedelta(microseconds=envelope["timestamp"] // 1000),
                data=record,
                message_id=envelope["message_id"],
                correlation_id=envelope["correlation_id"],
            )
        except DecodeError:
            raise
        except Exception as error:  # fastavro raises many kinds on garbage bytes
            raise DecodeError(f"undecodable message: {type(error).__name__}: {error}") from None
