"""``python -m localsgd ...`` is the ``localsgd`` command (torchrun starts workers this way)."""

import sys

from localsgd.cli import main

sys.exit(main())
