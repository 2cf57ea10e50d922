"""Entry point for ``python -m hookadapt``."""

import sys

from .cli import main

sys.exit(main())
