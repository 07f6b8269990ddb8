#!/usr/bin/env python
"""Check a downloaded VLFeedback release and optionally convert it to a preference parquet for training.

The code and --help: `silkie.tools.prepare_cli`.
"""

import sys

from silkie.tools.prepare_cli import main, parse_args  # noqa: F401  (tests call main)

if __name__ == "__main__":
    sys.exit(main())
