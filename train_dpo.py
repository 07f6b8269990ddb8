#!/usr/bin/env python
"""Per-process DPO training entry (normally started by launch_dpo.py under torchrun)."""

from __future__ import annotations

import argparse
import sys

from silkie.config import RecipeError, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe (dpo_config/*.yaml)")
    parser.add_argument("--working", required=True, help="run directory: checkpoints, adapter, metrics")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.learning_rate=5e-6")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from silkie.dpo.trainer import ResumeError
    from silkie.train import run_training

    try:
        run_training(recipe, args.working)
    except (RecipeError, ResumeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
