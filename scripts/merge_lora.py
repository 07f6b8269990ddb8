#!/usr/bin/env python
"""Merge a trained LoRA adapter into its base Qwen-VL-Chat weights and save a standalone checkpoint.

The code and --help: `silkie.tools.merge_cli`.
"""

import sys

from silkie.tools.merge_cli import main, parse_args  # noqa: F401  (tests call main)

if __name__ == "__main__":
    sys.exit(main())
