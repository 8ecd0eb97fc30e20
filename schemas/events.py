"""One definition of each event: Avro schemas generated from the domain event classes.

``tadpole schemas --write`` writes ``schemas/avro/*.avsc`` from :data:`EVENT_CLASSES`, the
events the families declare (:mod:`domain.registry`);
a unit test regenerates them and fails on any difference, so a class and its
committed schema cannot drift apart.
"""

from __future__ import annotations

import json
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any

from domain import registry
from domain.registry import event_type

AVRO_DIR = Path(__file__).parent / "avro"
NAMESPACE = "dev.tadpole.events"

#: Every event Tadpole stores: the families' declarations (domain/registry.py).
EVENT_CLASSES: tuple[type, ...] = registry.EVENTS

#: Fields every stored event has; the envelope carries them, not the payload.
_ENVELOPE_FIELDS = {"originator_id", "originator_version", "timestamp", "originator_topic"}

ENVELOPE_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "Envelope",
    "namespace": "dev.tadpole",
    "doc": "Seed 001's standard message envelope; payload is an Avro single-object encoding.",
    "fields": [
        {"name": "message_id", "type": "string"},
        {"name": "correlation_id", "type": "string"},
        {"name": "causation_id", "type": ["null", "string"], "default": None},
        {"name": "timestamp", "type": "long", "doc": "unix nanoseconds"},
        {"name": "source_system", "type": "string"},
        {"name": "destination_system", "type": ["null", "string"], "default": None},
        {"name": "message_type", "type": "string"},
        {"name": "schema_version", "type": "string"},
        {"name": "aggregate_type", "type": "string"},
        {"name": "aggregate_id", "type": "string"},
        {"name": "aggregate_version", "type": "long"},
        {"name": "position", "type": "long", "doc": "notification id in the event store"},
        {"name": "metadata", "type": {"type": "map", "values": "string"}, "default": {}},
        {"name": "payload", "type": "bytes"},
    ],
}


_FIELDS: dict[type, dict[str, Any]] = {}


def event_fields(cls: type) -> dict[str, Any]:
    """The payload fields of an event class and their Python types (computed once)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        fields = _FIELDS[cls] = _payload_fields(cls)
    return fields


def _payload_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {
        name: hint
        for name, hint in hints.items()
        if name not in _ENVELOPE_FIELDS and typing.get_origin(hint) is not typing.ClassVar
    }


def _avro_type(hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"only Optional unions map to Avro: {hint}")
        return ["null", _avro_type(args[0])]
    if origin is list:
        (item,) = typing.get_args(hint)
        return {"type": "array", "items": _avro_type(item)}
    simple = {str: "string", int: "long", float: "double", bool: "boolean"}
    if hint in simple:
        return simple[hint]
    if hint is datetime:
        return {"type": "long", "logicalType": "timestamp-micros"}
    raise TypeError(f"no Avro type for {hint!r}")


def event_schema(cls: type) -> dict[str, Any]:
    fields = []
    for name, hint in event_fields(cls).items():
        avro = _avro_type(hint)
        field: dict[str, Any] = {"name": name, "type": avro}
        if isinstance(avro, list):
            field["default"] = None
        fields.append(field)
    return {
        "type": "record",
        "name": event_type(cls).replace(".", ""),
        "namespace": NAMESPACE,
        "fields": fields,
    }


def rendered_schemas() -> dict[str, str]:
    """File name → text of every schema, as ``tadpole schemas --write`` writes them."""
    files = {"Envelope.avsc": ENVELOPE_SCHEMA}
    files.update({f"{event_type(c)}.avsc": event_schema(c) for c in EVENT_CLASSES})
    return {name: json.dumps(schema, indent=2) + "\n" for name, schema in files.items()}


def write_schemas(directory: Path = AVRO_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rendered_schemas().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written
