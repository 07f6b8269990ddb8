"""The speed levers a benchmark run can add on top of a path (`scripts/benchmark.py --levers`), each a recipe
switch: a lever run is the path's recipe plus these keys, measured side by side with the path itself."""

from __future__ import annotations

LEVERS = {  # lever name -> recipe keys (section -> key -> value)
    "flex": {"model": {"attn_implementation": "flex_attention"}},
    "varlen": {"model": {"attn_implementation": "varlen"}},
    "liger": {"model": {"liger_kernels": True}},
    "compile": {"model": {"compile_blocks": True}},
    "native_norm": {"model": {"fp32_norm_rope": False}},
    "pack2": {"dpo": {"pairs_per_row": 2}},
    "pack4": {"dpo": {"pairs_per_row": 4}},
    "pack8": {"dpo": {"pairs_per_row": 8}},
    "cached_ref": {"dpo": {"precompute_ref_log_probs": True}},  # on a path without it (levers with and without)
    # activation checkpointing: off, or only every N-th decoder layer (the memory it frees bought back as speed)
    "no_ckpt": {"training": {"gradient_checkpointing": False}},
    "ckpt2": {"training": {"gradient_checkpointing_kwargs": {"every_n_layers": 2}}},
    "ckpt4": {"training": {"gradient_checkpointing_kwargs": {"every_n_layers": 4}}},
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


# TRL's own switches (DPOConfig fields) for its runs: `--runs trl+no_ckpt`. TRL 1.16 has no others for a VLM:
# `precompute_ref_log_probs` is refused for vision datasets and `padding_free` falls back to padding.
TRL_LEVERS = {
    "no_ckpt": {"gradient_checkpointing": False},
    "liger": {"use_liger_kernel": True},
}


def at_batch(spec: str) -> tuple[str, int | None]:
    """`name@B` -> (name, B): a run only at batch size B; a spec without `@` runs at every batch size."""
    name, _, size = spec.partition("@")
    if not size:
        return name, None
    if not size.isdigit() or int(size) < 1:
        raise SystemExit(f"{spec!r}: expected NAME@BATCH with BATCH a whole number >= 1")
    return name, int(size)


def trl_keys(run: str) -> dict:
    """The DPOConfig fields of a TRL run name (`trl`, or `trl+` TRL levers joined by `+`)."""
    head, *names = run.split("+")
    if head != "trl":
        raise SystemExit(f"--runs: {run!r} is not a TRL run (trl[+LEVER...])")
    keys: dict = {}
    for name in names:
        if name not in TRL_LEVERS:
            raise SystemExit(f"--runs: unknown TRL lever {name!r} in {run!r}; expected one of {', '.join(TRL_LEVERS)}")
        keys.update(TRL_LEVERS[name])
    return keys


def lever_runs(paths: list[str], levers: list[str], size: int | None = None) -> list[tuple[str, str, dict]]:
    """(run name, path, extra recipe keys) for every path, then each lever spec on top of the last path; with
    `size`, only the runs that go at that batch size (a `@B` suffix keeps a path or lever spec to batch B)."""
    kept = [at_batch(path) for path in paths]
    runs = [(path, path, {}, spec_size) for path, spec_size in kept]
    last = kept[-1][0]
    runs += [(f"{last}+{spec}", last, lever_keys(spec), spec_size) for spec, spec_size in map(at_batch, levers)]
    # liger-kernel patches transformers' classes for the whole process (models built later get its modules), so
    # runs with it go last
    runs.sort(key=lambda run: "liger" in run[0].split("+"))
    return [run[:3] for run in runs if size is None or run[3] in (None, size)]


def check_batch_suffixes(specs: list[str], batch_sizes: list[int], option: str) -> None:
    """Refuse a `@B` whose B is not one of `--batch-sizes` (the run would never go) in one line."""
    for spec in specs:
        _, size = at_batch(spec)
        if size is not None and size not in batch_sizes:
            raise SystemExit(
                f"{option}: {spec!r} runs at batch {size}, which is not one of --batch-sizes {batch_sizes}"
            )
