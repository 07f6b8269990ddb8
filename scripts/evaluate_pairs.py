#!/usr/bin/env python
"""Reward accuracy, mean margin and chosen/rejected rewards of a trained run on its held-out pairs.

The code and --help: `silkie.tools.evaluate_cli`.
"""

import sys

from silkie.tools.evaluate_cli import main, parse_args  # noqa: F401  (tests call main)

if __name__ == "__main__":
    sys.exit(main())
