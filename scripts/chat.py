#!/usr/bin/env python
"""Ask a Qwen-VL-Chat model (optionally with a trained LoRA adapter) about an image, in one turn or several.

The code and --help: `silkie.tools.chat_cli`.
"""

import sys

from silkie.tools.chat_cli import main, parse_args  # noqa: F401  (tests call main)

if __name__ == "__main__":
    sys.exit(main())
