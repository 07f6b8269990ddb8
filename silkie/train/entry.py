"""`silkie train` / `train_dpo.py`: one training process (normally started by the launcher under torchrun)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from silkie.config import load_recipe
from silkie.errors import InputError
from silkie.logs import LEVELS, configure
from silkie.run_dir import ERROR_NAME, record_error


def main(argv: list[str] | None = None) -> int:
    """Train as the recipe says; 0, 2 after one line of bad input, 130 on Ctrl-C before training."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe (dpo_config/*.yaml)")
    parser.add_argument("--working", required=True, help="run directory: checkpoints, adapter, metrics")
    parser.add_argument("--log-level", choices=LEVELS, default=None, help="console messages (default: info)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. training.learning_rate=5e-6")
    args = parser.parse_args(argv)
    configure(args.log_level)
    try:
        recipe = load_recipe(args.config, args.overrides)
        from silkie.train import run_training

        run_training(recipe, args.working)
    except InputError as err:  # also a resume the checkpoint does not allow and a non-finite loss
        # bad input repeats on every rank and on a rerun: one line, no traceback; under launch_dpo.py the launcher
        # prints it from <working>/ERROR, else rank 0 and the rank that recorded it do
        wrote = record_error(args.working, str(err))
        launcher_prints = (
            os.environ.get("SILKIE_LAUNCHER_REPORTS_ERRORS") and (Path(args.working) / ERROR_NAME).is_file()
        )
        if not launcher_prints and (wrote or os.environ.get("RANK", "0") == "0"):
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training began, or a second one: the launcher says where things are
        return 130
    return 0
