"""`python -m tinydit ...`: see tinydit/cli.py. Hand-written (no notebook owns it)."""

import sys

from tinydit.cli import main


sys.exit(main())
