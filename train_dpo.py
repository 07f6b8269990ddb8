#!/usr/bin/env python
"""Per-process DPO training entry (normally started by launch_dpo.py under torchrun); the code: `silkie.train.entry`."""

import sys

from silkie.train.entry import main

if __name__ == "__main__":
    sys.exit(main())
