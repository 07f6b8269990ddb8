#!/usr/bin/env python
"""Benchmark DPO training steps side by side (`silkie bench`); see `silkie/dev/bench_cli.py` or --help."""

import sys

from silkie.dev.bench_cli import main, parse_args  # noqa: F401  (the tests call main)

if __name__ == "__main__":
    main()
    sys.exit(0)
