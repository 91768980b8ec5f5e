"""The training application: the ``lowrank-kernels`` CLI, its training loop, configs, techniques, data,
demo models, reports and sweeps.

Needs the ``app`` extra (``pip install "lowrank-kernels[app]"``: scikit-learn, matplotlib, pyyaml). The
library (everything outside this package) never imports it.
"""
