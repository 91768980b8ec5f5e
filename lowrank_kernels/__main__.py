"""``python -m lowrank_kernels``: the ``lowrank-kernels`` command line."""

import sys

from .cli import main

sys.exit(main())
