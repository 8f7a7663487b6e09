"""``python -m ivl``: same as the ``ivl`` command."""

import sys

from ivl.cli import main

sys.exit(main())
