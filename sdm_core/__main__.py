"""Entry point for ``python -m sdm_core``."""

import sys

from sdm_core.cli import main

sys.exit(main())
