"""``python -m server --bundle PATH [--backend transformers|vllm] ...`` (see ``--help``)."""

import sys

from server.cli import main

sys.exit(main())
