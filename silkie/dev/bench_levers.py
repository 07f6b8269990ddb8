"""The speed levers a benchmark run can add on top of a path (`scripts/benchmark.py --levers`), each a recipe
switch: a lever run is the path's recipe plus these keys, measured side by side with the path itself."""

from __future__ import annotations

import json

LEVERS = {  # lever name -> recipe keys (section -> key -> value)
    "flex": {"model": {"attn_implementation": "flex_attention"}},
    "varlen": {"model": {"attn_implementation": "varlen"}},
    "liger": {"model": {"liger_kernels": True}},
    "compile": {"model": {"compile_blocks": True}},
    "native_norm": {"model": {"fp32_norm_rope": False}},
    "pack2": {"dpo": {"pairs_per_row": 2}},
    "pack4": {"dpo": {"pairs_per_row": 4}},
    "pack8": {"dpo": {"pairs_per_row": 8}},
}


def lever_keys(spec: str) -> dict:
    """The recipe keys of a lever spec: one lever or several joined by `+` (e.g. `liger+compile+pack4`)."""
    keys: dict = {}
    for name in spec.split("+"):
        if name not in LEVERS:
            raise SystemExit(f"--levers: unknown lever {name!r} in {spec!r}; expected one of {', '.join(LEVERS)}")
        for section, values in LEVERS[name].items():
            keys.setdefault(section, {}).update(values)
    return keys


def lever_runs(paths: list[str], levers: list[str]) -> list[tuple[str, str, dict]]:
    """(run name, path, extra recipe keys) for every path, then each lever spec on top of the last path."""
    runs = [(path, path, {}) for path in paths]
    if levers:
        last = paths[-1]
        # liger-kernel patches transformers' classes for the whole process (models built later get its modules),
        # so runs with it go last
        ordered = sorted(levers, key=lambda spec: "liger" in spec.split("+"))
        runs += [(f"{last}+{spec}", last, lever_keys(spec)) for spec in ordered]
    return runs


def without_compile(spec_keys: dict) -> dict:
    """The same keys without regional compilation (whose FLOPs a counter cannot see through the compiled graph)."""
    kept = {section: {k: v for k, v in keys.items() if k != "compile_blocks"} for section, keys in spec_keys.items()}
    return {section: keys for section, keys in kept.items() if keys}


def lever_id(spec_keys: dict) -> str:
    """A canonical name of a set of recipe keys (to find the run with the same keys)."""
    return json.dumps(spec_keys, sort_keys=True)
