#!/usr/bin/env python
"""Write a tiny random Hugging Face-format VLM folder (Qwen2-VL, Qwen2.5-VL or LLaVA-1.5) for tests and demos.

The code and --help: `silkie.dev.tiny_hf_vlm_cli`.
"""

import sys

from silkie.dev.tiny_hf_vlm_cli import main

if __name__ == "__main__":
    sys.exit(main())
