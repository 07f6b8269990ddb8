"""Small checks the recipe schema is built from: a value in range or in a set, of a type; errors name the key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any

from silkie.errors import RecipeError


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """RecipeError naming `key`, its value and what is `allowed` unless `ok`."""
    if not ok:
        raise RecipeError(f"recipe: {key} = {value!r} is not allowed; expected {allowed}")


def choice(key: str, value: Any, allowed: tuple) -> None:
    """RecipeError unless `value` is one of `allowed` (naming the closest one first when there is one)."""
    if value in allowed:
        return
    names = [str(a) for a in allowed]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6) if isinstance(value, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    require(False, key, value, "one of " + ", ".join(repr(a) for a in allowed) + hint)


# the names users bring from peft, TRL and LLaMA-Factory for keys this schema spells otherwise
KNOWN_ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target": "target_modules",
    "target": "target_modules",
    "model_name_or_path": "path",
    "pref_beta": "beta",
    "pref_loss": "loss_type",
}


def suggest(name: str, known: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest known name (or the one another library calls `name`), else empty."""
    if KNOWN_ALIASES.get(name) in known:
        return f" (did you mean '{KNOWN_ALIASES[name]}'?)"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def type_ok(value: Any, annotation: Any) -> bool:
    """Whether `value` (from YAML) fits the type `annotation` (unions, lists, dicts; ints are not floats' bools)."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    if origin is dict:
        key_type, value_type = typing.get_args(annotation)
        return isinstance(value, dict) and all(
            type_ok(k, key_type) and type_ok(v, value_type) for k, v in value.items()
        )
    return isinstance(value, annotation)


def coerce(value: Any, annotation: Any) -> Any:
    """A numeric string becomes a float where only a float is allowed; ints stay ints (a float field takes them,
    and config.yaml keeps `logging_steps: 5` as written)."""
    if isinstance(value, str) and not type_ok(value, annotation) and type_ok(1.0, annotation):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def describe(annotation: Any) -> str:
    """A type annotation as a user reads it."""
    return str(annotation).replace("typing.", "").replace("<class '", "").replace("'>", "")


def key(default: Any = None, help: str = "", read_by: str = "", factory: Any = None) -> Any:
    """A recipe key: its default, its one-line help (the recipe reference) and the functions that read it
    (`module:qualname` under `silkie.`, space-separated)."""
    metadata = {"help": help, "read_by": read_by}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)
