"""``python -m qtwist``: the same command as the ``qtwist`` console script."""

import sys

from qtwist.cli import main

sys.exit(main())
