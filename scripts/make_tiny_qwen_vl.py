#!/usr/bin/env python
"""Write a tiny random Qwen-VL-Chat checkpoint folder (official format) for tests and the demo.

The code and --help: `silkie.dev.tiny_qwen_vl_cli`.
"""

import sys

from silkie.dev.tiny_qwen_vl_cli import main

if __name__ == "__main__":
    sys.exit(main())
