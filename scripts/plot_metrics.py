#!/usr/bin/env python
"""Plot a run's training curves (loss, reward accuracy, margins, chosen/rejected rewards; train and eval).

The code and --help: `silkie.tools.plot_cli`.
"""

import sys

from silkie.tools.plot_cli import main, parse_args  # noqa: F401  (tests call main)

if __name__ == "__main__":
    sys.exit(main())
