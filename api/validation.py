"""Request input: parse, check every field, and say exactly what is wrong.

Every value a command takes must fit everything downstream of the API: the event
store and the read models (PostgreSQL refuses NUL in text; bigint columns and
Avro ``long`` hold signed 64 bits; a double must be finite). These rules live
here, once, and every part of a request goes through them: the whole JSON body
(each field, nested or listed, known or not), the path's parameters, and the
headers a command keeps.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import falcon
import falcon.asgi
import orjson

MAX_BODY = 1024 * 1024
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


async def json_body(req: falcon.asgi.Request) -> dict[str, Any]:
    """The request's JSON object, every value in it fit to store.

    413 over 1 MiB; 400 when it is not a JSON object or a value does not fit.
    """
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f"the body is over {MAX_BODY} bytes")
    raw = await req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f"the body is over {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        _name_the_non_finite(raw)
        raise falcon.HTTPBadRequest(description=f"malformed JSON: {error}") from None
    if not isinstance(body, dict):
        raise falcon.HTTPBadRequest(description="the body must be a JSON object")
    if _MAY_NOT_FIT.search(raw):  # the walk names the field; most bodies need none
        fits(body)
    return body


#: What a value that does not fit must look like in the raw body: orjson refuses raw
#: control characters, NaN, Infinity and numbers beyond a double, so a NUL can only
#: come as the escape ``\u0000`` and an integer beyond 64 bits has 19 digits or more.
#: Anything else parsed fits, and the walk over every field is skipped.
_MAY_NOT_FIT = re.compile(rb"\\u0000|[0-9]{19}")


def fits(value: Any, where: str = "") -> None:
    """Raise a 400 naming the first part of ``value`` (a parsed JSON value) that does not fit.

    Nested fields are named ``iterations.min``, list items ``algorithms[1]``. A
    walk with its own stack: orjson nests 1024 deep, past Python's recursion limit.
    """
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        name, item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                text_fits(key, f"a field name in {name or 'the body'}")
                stack.append((f"{name}.{key}" if name else key, inner))
        elif isinstance(item, list):
            stack.extend((f"{name}[{i}]", inner) for i, inner in enumerate(item))
        else:
            scalar_fits(item, name)


def scalar_fits(value: Any, name: str) -> None:
    if isinstance(value, str):
        text_fits(value, name)
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise _bad(name, f"must be from {INT64_MIN} to {INT64_MAX} (64 bits)")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _bad(name, "must be a finite number")


def text_fits(value: str, name: str) -> None:
    if "\x00" in value:
        raise _bad(name, "must not contain NUL (\\u0000)")


def _name_the_non_finite(raw: bytes) -> None:
    """Name the field when orjson refused a ``NaN``, ``Infinity`` or ``1e400`` in it.

    orjson refuses them as malformed JSON, which names only a position; the
    standard library reads them (as non-finite floats), so the walk can name the
    field. Only on the error path: anything else keeps orjson's message.
    """
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return
    fits(body)


def header(req: falcon.asgi.Request, name: str, *, max_len: int) -> str | None:
    """A header a command keeps: 1 to ``max_len`` characters, no NUL."""
    value = req.get_header(name)
    if value is None:
        return None
    if not 0 < len(value) <= max_len:
        raise falcon.HTTPBadRequest(description=f"{name} must be 1 to {max_len} characters")
    text_fits(value, name)
    return value


class PathParams:
    """Falcon middleware: a path parameter (a job's, a task's id) goes through the same rules."""

    async def process_resource(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        resource: object,
        params: dict[str, Any],
    ) -> None:
        for name, value in params.items():
            scalar_fits(value, name)


def _bad(name: str, what: str) -> falcon.HTTPBadRequest:
    return falcon.HTTPBadRequest(description=f"{name} {what}")


def text(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = True,
    max_len: int = 4096,
    default: str | None = None,
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, "is required")
        return default
    if not isinstance(value, str):
        raise _bad(name, "must be a string")
    if required and not value.strip():
        raise _bad(name, "must not be empty")
    if len(value) > max_len:
        raise _bad(name, f"must be at most {max_len} characters")
    text_fits(value, name)
    return value


def integer(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = True,
    low: int | None = None,
    high: int | None = None,
    default: int | None = None,
    label: str | None = None,
) -> int | None:
    label = label or name
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(label, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(label, "must be an integer")
    scalar_fits(value, label)
    if low is not None and value < low:
        raise _bad(label, f"must be at least {low}")
    if high is not None and value > high:
        raise _bad(label, f"must be at most {high}")
    return value


def number(body: dict[str, Any], name: str, *, required: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, "is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, "must be a number")
    scalar_fits(value, name)
    return float(value)


def boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, "must be true or false")
    return value


def strings(body: dict[str, Any], name: str) -> list[str]:
    value = body.get(name)
    if value is None:
        raise _bad(name, "is required")
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _bad(name, "must be a list of non-empty strings")
    if not value:
        raise _bad(name, "must name at least one algorithm")
    fits(value, name)
    return value


def obj(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        raise _bad(name, "is required")
    if not isinstance(value, dict):
        raise _bad(name, "must be an object with min, max and step")
    return value


def string_map(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = False,
    max_entries: int = 64,
    max_key: int = 64,
    max_value: int = 1024,
) -> dict[str, str]:
    """A JSON object of strings (capabilities, properties: seed 000's ``map<string, string>``)."""
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(name, "is required")
        return {}
    if not isinstance(value, dict):
        raise _bad(name, "must be an object of strings")
    if len(value) > max_entries:
        raise _bad(name, f"must have at most {max_entries} entries")
    for key, item in value.items():
        if not 0 < len(key) <= max_key:
            raise _bad(name, f"keys must be 1 to {max_key} characters")
        if not isinstance(item, str):
            raise _bad(f"{name}.{key}", "must be a string")
        if len(item) > max_value:
            raise _bad(f"{name}.{key}", f"must be at most {max_value} characters")
    fits(value, name)
    return value


def number_map(body: dict[str, Any], name: str, *, max_entries: int = 64) -> dict[str, float]:
    """A non-empty JSON object of finite numbers (performance metrics)."""
    value = body.get(name)
    if not isinstance(value, dict) or not value:
        raise _bad(name, "must be a non-empty object of numbers")
    if len(value) > max_entries:
        raise _bad(name, f"must have at most {max_entries} entries")
    for key, item in value.items():
        if not 0 < len(key) <= 64:
            raise _bad(name, "keys must be 1 to 64 characters")
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise _bad(f"{name}.{key}", "must be a number")
    fits(value, name)
    return {k: float(x) for k, x in value.items()}


def name_list(
    body: dict[str, Any], name: str, *, max_entries: int = 64, max_len: int = 256
) -> list[str]:
    """A list of non-empty strings (a context's hierarchies); empty when left out."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise _bad(name, "must be a list of non-empty strings")
    if len(value) > max_entries:
        raise _bad(name, f"must have at most {max_entries} entries")
    if any(len(x) > max_len for x in value):
        raise _bad(name, f"entries must be at most {max_len} characters")
    fits(value, name)
    return value


def section(body: dict[str, Any], name: str) -> dict[str, Any]:
    """A nested JSON object that must be there (``resources``)."""
    value = body.get(name)
    if value is None:
        raise _bad(name, "is required")
    if not isinstance(value, dict):
        raise _bad(name, "must be an object")
    return value
