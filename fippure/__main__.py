"""``python -m fippure``: the same command line as the ``fippure`` script."""

import sys

from fippure.cli import main

sys.exit(main())
