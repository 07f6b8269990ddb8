#!/usr/bin/env python
"""Create the demos' stand-ins: tiny checkpoints of each model family and a synthetic VLFeedback release.

The code and --help: `silkie.dev.demo_assets`.
"""

import sys

from silkie.dev.demo_assets import main

if __name__ == "__main__":
    sys.exit(main())
