#!/usr/bin/env python
"""Write a tiny synthetic VLFeedback release (`vlfeedback_80k.jsonl` + `merged_images.zip`) to OUT.

The code and --help: `silkie.dev.synthetic_cli`.
"""

from silkie.dev.synthetic_cli import main, parse_args  # noqa: F401  (tests call main)

if __name__ == "__main__":
    main()
