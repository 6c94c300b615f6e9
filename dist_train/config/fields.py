"""Declaring a config field once: its default, flag help, type and allowed values.

Each component's dataclass uses `option(...)`, so the CLI flags, the YAML keys and
the validation messages are all derived from one declaration and cannot drift.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterable, Sequence

Check = Callable[[Any], "str | None"]


def option(
    default: Any,
    help: str,
    *,
    kind: type | str,
    choices: Sequence[str] | Callable[[], Iterable[str]] | None = None,
    check: Check | None = None,
    nullable: bool = False,
    secret: bool = False,
) -> Any:
    """A dataclass field carrying what the CLI and the validator need to know."""
    meta = {"help": help, "kind": kind, "choices": choices, "check": check,
            "nullable": nullable, "secret": secret}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def fraction(value: Any) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def allowed_choices(meta: dict) -> list[str] | None:
    choices = meta.get("choices")
    if choices is None:
        return None
    return sorted(choices() if callable(choices) else choices)


def coerce(value: Any, meta: dict) -> tuple[Any, str | None]:
    """Turn a YAML or flag value into the field's type; (value, error message)."""
    kind = meta["kind"]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and meta["nullable"]):
        return (None, None) if meta["nullable"] else (None, "must be set")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value, None
            text = str(value).strip().lower()
            if text in ("true", "yes", "1", "on"):
                return True, None
            if text in ("false", "no", "0", "off"):
                return False, None
            return None, "must be true or false"
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                return None, "must be a whole number"
            return int(str(value).strip()) if isinstance(value, str) else int(value), None
        if kind is float:
            if isinstance(value, bool):
                return None, "must be a number"
            number = float(value)
            if not math.isfinite(number):
                return None, "must be a finite number"
            return number, None
        if kind is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                return None, "must be a string"
            return str(value), None
        if kind == "json":
            parsed = json.loads(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                return None, "must be a JSON object"
            return parsed, None
    except (TypeError, ValueError):
        what = {int: "a whole number", float: "a number", "json": "a JSON object"}.get(kind, str(kind))
        return None, f"must be {what}"
    raise AssertionError(f"unknown field kind {kind!r}")


def validate(value: Any, meta: dict) -> str | None:
    """The field's own rule (choices, range); None when the value is fine."""
    if value is None:
        return None
    choices = allowed_choices(meta)
    if choices is not None and value not in choices:
        return "must be one of " + ", ".join(choices)
    check = meta.get("check")
    return check(value) if check else None
