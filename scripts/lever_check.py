#!/usr/bin/env python
"""Each speed lever (flex, liger, compile, native_norm, packing) against the fp32 reference on one batch.

The code and --help: `silkie.dev.lever_check`.
"""

import sys

from silkie.dev.lever_check import main

if __name__ == "__main__":
    sys.exit(main())
