"""``Q3RConfig``: every setting of the Q3R regulariser in one validated dataclass.

:class:`~lowrank_kernels.q3r.Q3R`, :class:`~lowrank_kernels.q3r.AdamQ3R` and the training app's command line
read their settings, defaults and help text from here (as PEFT's ``LoraConfig`` does for LoRA), so the three
cannot drift apart. Keyword arguments of ``Q3R``/``AdamQ3R`` override the fields of a ``config=`` they are
given (:meth:`Q3RConfig.merged`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["SCHEDULES", "Q3RConfig"]

SCHEDULES = ("default", "linear", "constant", "exploration")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_rank_spec(spec, where: str = "target_rank") -> None:
    """Raise unless ``spec`` is an int >= 1 (absolute rank) or a float in (0, 1) (fraction of ``min(m, n)``).

    ``TypeError`` for a value that is not a number (``True``, ``"0.2"``, ``None``), ``ValueError`` for a number
    out of range; both name ``where`` and the value."""
    if isinstance(spec, bool) or not isinstance(spec, (numbers.Integral, numbers.Real)):
        raise TypeError(f"{where} must be an int or a float, got {type(spec).__name__} {spec!r}")
    if _is_int(spec):
        if spec < 1:
            raise ValueError(f"{where} = {spec}: an int target rank must be >= 1")
    elif not (math.isfinite(spec) and 0.0 < spec < 1.0):
        raise ValueError(f"{where} = {spec}: a float target rank must lie in (0, 1) (a fraction of min(m, n)); "
                         f"pass an int for an absolute rank")


@dataclass
class Q3RConfig:
    """The settings of :class:`~lowrank_kernels.q3r.Q3R` (see its docstring for the maths).

    Every numeric field is checked in ``__post_init__`` (finite, in range, integers stay integers); a bad value
    raises ``ValueError`` (``TypeError`` for a rank that is not a number) naming the field and the value.
    """

    target_rank: int | float | Sequence[int | float] = _f(
        0.25, "target rank per operator: a float in (0, 1) is a fraction of min(m, n), an int >= 1 an absolute "
              "rank; or a list with one entry per operator (modules in order, slices in order within a module)")
    lmbda: float = _f(0.1, "regularisation strength lambda (>= 0): the term is lambda <X, L X R>")
    steps: int = _f(5, "rebuild the operators every `steps` updates (optimizer steps); the first update rebuilds")
    epsilon_schedule: str = _f(
        "default", "how eps moves at each rebuild: 'default' eps <- min(eps, sigma_{r+1}); 'linear' geometric "
                   "decay from sigma_{r+1} of the first rebuild to eps_min over N updates; 'constant' eps = "
                   "epsilon (or sigma_{r+1} of the first rebuild); 'exploration' eps = sigma_{r+1} every rebuild")
    N: int | None = _f(None, "updates (optimizer steps, not rebuilds) of the 'linear' schedule's decay")
    eps_min: float = _f(1e-6, "final eps of the 'linear' schedule (> 0)")
    epsilon: float | None = _f(None, "eps of the 'constant' schedule (None: sigma_{r+1} of the first rebuild)")
    oversample: int = _f(8, "extra sketch columns of the randomized SVD beyond the computed triplets (>= 0)")
    n_iter: int = _f(2, "subspace iterations of a cold randomized rebuild and of a refinement (>= 0)")
    warm_start: bool = _f(
        True, "rebuild from the previous rebuild's right singular vectors (one product; the first rebuild is "
              "exact up to min(m, n) = 1024) instead of a cold randomized SVD every time")
    rebuild_tol: float | None = _f(
        0.05, "a rebuild's triplets are refined when a Ritz residual ||X v_i - s_i u_i|| exceeds rebuild_tol "
              "* s_i for a triplet that is kept or sets eps (None: no check)")
    seed: int = _f(0, "base seed of the per-operator randomized SVD sketches")

    def __post_init__(self) -> None:
        spec = self.target_rank
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError("target_rank is an empty list: give one rank per operator")
            for j, s in enumerate(spec):
                check_rank_spec(s, f"target_rank[{j}]")
            self.target_rank = list(spec)
        else:
            check_rank_spec(spec)
        if not (_is_real(self.lmbda) and math.isfinite(self.lmbda) and self.lmbda >= 0):
            raise ValueError(f"lmbda must be a finite number >= 0, got {self.lmbda!r}")
        for name, minimum in (("steps", 1), ("oversample", 0), ("n_iter", 0)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.epsilon_schedule not in SCHEDULES:
            raise ValueError(f"epsilon_schedule={self.epsilon_schedule!r} is not one of {SCHEDULES}")
        if self.N is not None and (not _is_int(self.N) or self.N < 1):
            raise ValueError(f"N must be an int >= 1 (optimizer steps) or None, got {self.N!r}")
        if self.epsilon_schedule == "linear" and self.N is None:
            raise ValueError("epsilon_schedule='linear' needs N (an int >= 1, optimizer steps), got N=None")
        if not (_is_real(self.eps_min) and math.isfinite(self.eps_min) and self.eps_min > 0):
            raise ValueError(f"eps_min must be a finite number > 0, got {self.eps_min!r}")
        if self.epsilon is not None and not (_is_real(self.epsilon) and math.isfinite(self.epsilon)
                                             and self.epsilon >= 0):
            raise ValueError(f"epsilon must be a finite number >= 0 or None, got {self.epsilon!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {self.warm_start!r}")
        if self.rebuild_tol is not None and not (_is_real(self.rebuild_tol) and math.isfinite(self.rebuild_tol)
                                                 and self.rebuild_tol > 0):
            raise ValueError(f"rebuild_tol must be a finite number > 0 or None, got {self.rebuild_tol!r}")

    @classmethod
    def merged(cls, config: Q3RConfig | Mapping | None = None, **overrides) -> Q3RConfig:
        """``config`` (a ``Q3RConfig``, a mapping of its fields, or None for the defaults) with ``overrides``
        applied, validated. An unknown name raises ``TypeError`` as an unexpected keyword argument would."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if isinstance(config, Mapping):
            unknown += sorted(set(config) - names)
            config = {k: v for k, v in config.items() if k in names}
        if unknown:
            raise TypeError(f"unknown Q3R setting(s) {unknown}; the settings are {sorted(names)}")
        if config is None:
            return cls(**overrides)
        if isinstance(config, Mapping):
            return cls(**{**config, **overrides})
        if not isinstance(config, cls):
            raise TypeError(f"config must be a Q3RConfig or a mapping of its fields, got {type(config).__name__}")
        return dataclasses.replace(config, **overrides)

    def to_dict(self) -> dict:
        """The fields as a plain dict (JSON-friendly)."""
        return dataclasses.asdict(self)
