#!/usr/bin/env python
"""Print the recipe reference (dpo_config/README.md) as markdown, generated from the schema dataclasses.

The code and --help: `silkie.dev.recipe_reference`.
"""

import sys

from silkie.dev.recipe_reference import main, render, undocumented  # noqa: F401  (a test calls them)

if __name__ == "__main__":
    sys.exit(main())
