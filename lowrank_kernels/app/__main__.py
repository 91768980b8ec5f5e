"""``python -m lowrank_kernels.app``: the ``lowrank-kernels`` command line."""

import sys

from .cli import main

sys.exit(main())
