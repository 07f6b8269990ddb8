#!/usr/bin/env python
"""Data-pipeline benchmark: pairs/s of building + tokenizing N synthetic VLFeedback instructions, cold and cached.

The code and --help: `silkie.dev.bench_data`.
"""

from silkie.dev.bench_data import main

if __name__ == "__main__":
    main()
