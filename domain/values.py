"""Plain values as the events store them."""

from __future__ import annotations

import json


def compact_json(value: object) -> str:
    """``value`` as compact JSON with sorted keys: the same value is always the same text."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
