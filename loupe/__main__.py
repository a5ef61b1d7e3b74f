"""``python -m loupe``: the same as the ``loupe`` command."""

import sys

from loupe.cli import main

sys.exit(main())
