#!/usr/bin/env python
"""Launch DPO training from a recipe: locally with torchrun, or on Slurm with --gpus N (see --help)."""

from __future__ import annotations

import sys

from silkie.launch import main

if __name__ == "__main__":
    sys.exit(main())
