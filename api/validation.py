"""Request bodies: parse, check every field, and say exactly what is wrong."""

from __future__ import annotations

from typing import Any

import falcon
import orjson

MAX_BODY = 1024 * 1024


async def json_body(req: falcon.asgi.Request) -> dict[str, Any]:
    """The request's JSON object; 413 over 1 MiB, 400 when it is not a JSON object."""
    if req.content_length is not None and req.content_length > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f"the body is over {MAX_BODY} bytes")
    raw = await req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise falcon.HTTPContentTooLarge(description=f"the body is over {MAX_BODY} bytes")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise falcon.HTTPBadRequest(description=f"malformed JSON: {error}") from None
    if not isinstance(body, dict):
        raise falcon.HTTPBadRequest(description="the body must be a JSON object")
    return body


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
    return value


def obj(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        raise _bad(name, "is required")
    if not isinstance(value, dict):
        raise _bad(name, "must be an object with min, max and step")
    return value
