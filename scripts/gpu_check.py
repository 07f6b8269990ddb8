#!/usr/bin/env python
"""GPU proof script (one run on the lent card): CUDA correctness, Qwen-VL-Chat-size step + generation, benchmark.

The code and --help: `silkie.dev.gpu_check`.
"""

import sys

from silkie.dev.gpu_check import main

if __name__ == "__main__":
    sys.exit(main())
