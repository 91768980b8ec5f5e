"""Q3R, the quadratic reweighted rank regularizer (Nguyen, Ghosh and Kümmerle), and what is built on it.

* :mod:`.config`: :class:`Q3RConfig`, the settings shared by ``Q3R``, ``AdamQ3R`` and the app's CLI.
* :mod:`.operator`: one operator per weight or fused slice, its rank and rebuild maths.
* :mod:`.regularizer`: :class:`Q3R` (value, gradient, rebuilds) and :func:`extract_linear`.
* :mod:`.optim`: :class:`AdamQ3R`, Adam with the decoupled Q3R term, a ``torch.optim.Optimizer``.
* :mod:`.lorita`: LoRITa over-parameterisation with Q3R on the composed weight.
"""

from .config import Q3RConfig
from .lorita import ComposedQ3R, LoRITaLinear, apply_lorita, compose_lorita
from .operator import EPS_START, resolve_rank
from .optim import AdamQ3R
from .regularizer import Q3R, extract_linear

__all__ = ["EPS_START", "AdamQ3R", "ComposedQ3R", "LoRITaLinear", "Q3R", "Q3RConfig", "apply_lorita", "compose_lorita",
           "extract_linear", "resolve_rank"]
