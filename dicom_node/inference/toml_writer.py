"""A small TOML writer for model cards (``tomllib`` reads TOML but does not write it)."""

from __future__ import annotations

import json
import math
from typing import Any


def render_card(values: dict[str, Any]) -> str:
    """A card's TOML from plain values (top-level keys, then tables), in a stable order."""
    lines = []
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    for key, value in values.items():
        if not isinstance(value, dict):
            lines.append(f"{key} = {_toml_value(value)}")
    for table, entries in tables.items():
        lines.append("")
        lines.append(f"[{table}]")
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in entries.items())
    return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    bare = key and all(c.isalnum() or c in "-_" for c in key) and key.isascii()
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "nan"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string
