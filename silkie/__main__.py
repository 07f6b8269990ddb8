"""`python -m silkie VERB ...`: the `silkie` command."""

import sys

from silkie.cli import main

sys.exit(main())
