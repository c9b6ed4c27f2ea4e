"""Writing TOML values (the standard library reads TOML but does not write it)."""

from __future__ import annotations

import json


def toml_string(text: str) -> str:
    """A TOML basic string; JSON's escapes are all valid TOML escapes, but JSON leaves
    DEL (U+007F) raw, which TOML forbids in a basic string."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: bool | int | float | str | list[str]) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)
