"""Recipe YAML: YAML 1.2 scalars in and out (PyYAML implements YAML 1.1), and `section.key=value` overrides.
Imports no torch."""

from __future__ import annotations

import copy
import re
import typing
from typing import Any

import yaml

from silkie.errors import RecipeError


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.2 scalars: only true/false are booleans ("no" stays the string HF strategies use), `1e-5` is a float
    (PyYAML's YAML 1.1 rules read it as a string), `48:00:00` is a string (not 172800) and dates stay strings.
    A key written twice is accepted with the same value (the Silkie repository's recipe has `bf16: true` twice) and
    refused with two different ones (PyYAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        self.flatten_mapping(node)
        seen: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key, value = self.construct_object(key_node, deep=True), self.construct_object(value_node, deep=True)
            if not isinstance(key, typing.Hashable):
                break  # the mapping constructor below refuses it with its own message
            if key in seen and seen[key] != value:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is set twice, to {seen[key]!r} and then {value!r}", key_node.start_mark
                )
            seen[key] = value
        return super().construct_mapping(node, deep=deep)


_YAML_1_1_ONLY = {
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:timestamp",
}
RecipeLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_1_1_ONLY]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RESOLVERS = [
    ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    ("tag:yaml.org,2002:int", re.compile(r"^[-+]?[0-9][0-9_]*$"), list("-+0123456789")),  # 10_000 as before
    (
        "tag:yaml.org,2002:float",
        re.compile(
            r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
        ),
        list("-+.0123456789"),
    ),
]
for _tag, _regexp, _first in _RESOLVERS:
    RecipeLoader.add_implicit_resolver(_tag, _regexp, _first)
# decimal, also with leading zeros (PyYAML would read 010 as octal 8)
RecipeLoader.add_constructor(
    "tag:yaml.org,2002:int", lambda loader, node: int(loader.construct_scalar(node).replace("_", ""), 10)
)


class RecipeDumper(yaml.SafeDumper):
    """Quotes every string that reads as something else under these rules or PyYAML's YAML 1.1 ones ("0815",
    "24:00:00"), so RecipeLoader and plain `yaml.safe_load` both read config.yaml back unchanged."""


RecipeDumper.yaml_implicit_resolvers = {
    key: list(yaml.SafeLoader.yaml_implicit_resolvers.get(key, []))
    + list(RecipeLoader.yaml_implicit_resolvers.get(key, []))
    for key in set(yaml.SafeLoader.yaml_implicit_resolvers) | set(RecipeLoader.yaml_implicit_resolvers)
}


def dump_yaml(data: Any) -> str:
    """Recipe YAML that `parse_yaml` reads back to the same values."""
    return yaml.dump(data, Dumper=RecipeDumper, sort_keys=False)


def parse_yaml(text: str) -> Any:
    """Parse recipe YAML (YAML 1.2 booleans and numbers)."""
    return yaml.load(text, Loader=RecipeLoader)


def yaml_error(err: yaml.YAMLError, source: str) -> str:
    """A YAML syntax error as one line: `source:line:column: not valid YAML: problem (context)`."""
    mark = getattr(err, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else source
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")
    return " ".join(text.split())


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (path, YAML-parsed value)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) < 2 or not all(path):
        raise RecipeError(f"override '{text}': the key must be section.key (e.g. training.learning_rate=5e-6)")
    try:
        return path, parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(yaml_error(err, f"override '{text}'")) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to a raw recipe dict (returns a new dict)."""
    result = copy.deepcopy(raw) or {}
    for text in overrides:
        path, value = parse_override(text)
        node = result
        for part in path[:-1]:
            if node.get(part) is None:  # absent, or an empty `section:` line in the file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise RecipeError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return result


def override_named_in(message: str, overrides: list[str]) -> str | None:
    """`override 'TEXT'` for the (last) override whose key a validation message names, else None."""
    for text in reversed(overrides):
        key = text.split("=", 1)[0].strip()
        if f"{key} =" in message or f"'{key}'" in message or f"section '{key.split('.')[0]}'" in message:
            return f"override '{text}'"
    return None
