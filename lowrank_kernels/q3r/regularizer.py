"""Q3R: quadratic reweighted rank regularizer (Nguyen, Ghosh and Kümmerle, arXiv:2511.04485).

One *operator* per regularised weight matrix, or per slice of output features of a fused one (QKV). Weights
are read in ``nn.Linear``'s orientation ``X (m, n) = (out, in)``; transformers' ``Conv1D`` (stored
``(in, out)``) through its transpose. Every ``steps`` calls of :meth:`Q3R.update` each operator is rebuilt from
the current weight: its top singular triplets are computed (:meth:`Q3R.refresh`, below), ``eps`` moves by its
schedule, and the triplets with ``sigma_i > eps`` (beyond rounding) are kept as ``U (m, k)``, ``sigma (k,)``,
``V (n, k)``. With ``d_i = min(eps / sigma_i, 1) - 1``, ``L = I + U diag(d) U^T`` and ``R = I + V diag(d) V^T``:

* value ``Q(X) = lmbda <X, L X R>`` (differentiable in ``X``: :attr:`Q3R.val` can be added to a loss);
* gradient ``G(X) = 2 lmbda L X R = 2 lmbda (X + A B)`` with the rank-``2k`` factors
  ``A = [U, Q D]`` and ``B = [D (P + C D V^T); V^T]``, ``P = U^T X``, ``Q = X V``, ``C = U^T X V``,
  so no ``m x m`` or ``n x n`` matrix is ever formed.

Rebuilds. Same-shape operators share batched calls. An operator's first rebuild is the exact SVD where
``min(m, n) <= 1024`` (a cold randomized estimate of ``sigma_{r+1}`` is several % low on the flat spectra of
freshly initialised weights, and the default schedule keeps that low ``eps`` for the whole run), a randomized
truncated SVD (:func:`ops.truncated_svd`) beyond. Later rebuilds are warm: one product with the previous
rebuild's right singular vectors plus seeded oversampling columns and the Rayleigh-Ritz projection, i.e. one
step of a subspace iteration that runs across rebuilds. That step is accurate while the weights move little
between rebuilds and can be far off when they move a lot (early training at a large learning rate), so every
randomized result is checked a posteriori: the Ritz residuals ``||X v_i - s_i u_i||`` (one batched product;
``X^T u_i = s_i v_i`` holds by construction) of the triplets that are kept or set ``eps`` must stay within
``rebuild_tol * s_i``. The operators that fail get ``max(1, n_iter)`` more subspace iterations from their own
vectors, and those still failing the exact SVD (``min(m, n) <= 1024``; larger ones are kept with a warning).
All sigma and residuals of a rebuild reach the host in one read, plus one per refinement round.

Differences from the upstream Q3R code (the authors' research code), on purpose:

* ``target_rank`` as a float is a fraction of ``min(m, n)`` (the upstream code takes it of ``max(m, n)``,
  contrary to its own documentation) and an int is an absolute rank (the upstream code scales it by
  ``max/min``).
* The ``linear`` eps schedule decays over ``N`` *optimizer steps* (calls of :meth:`Q3R.update`); the upstream
  code's ``N`` counts rebuilds, so its decay is ``steps`` times slower for the same ``N``.
* ``val`` is differentiable (the upstream code's is detached, so adding it to the loss did nothing).
* :func:`extract_linear` selects only the named targets (``nn.Linear`` and ``Conv1D``) and keeps fused
  slices as separate operators (the upstream code regularises every ``nn.Linear`` and drops the slices).
* The gradient is applied through thin factors (above) or, in :class:`~lowrank_kernels.q3r.AdamQ3R`, as a
  decoupled step like weight decay; the upstream code forms ``L`` and ``R`` densely.
* Singular triplets come from the exact first rebuild and then warm-started randomized rebuilds with the
  a-posteriori check (above), instead of a full SVD at every rebuild; one seeded sketch per operator makes
  the results reproducible, independent of the global RNG and identical between one process and DDP.
* LoRITa (:mod:`lowrank_kernels.q3r.lorita`): the operators act on the composed weight ``W_1 ... W_depth`` and
  their gradient reaches every factor through the chain rule; the upstream LoRITa+Q3R passes a
  non-differentiable value to the loss, so its training is plain Adam on the factors.
* Under ``torch.distributed`` the operators are split over the ranks by cost and their states shared.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .. import backend, ops
from .. import distributed as _dist
from .._checks import finite_flags
from .._modules import fused_slices, is_conv1d, is_linear_like, linear_weight, matches_target
from ..ops.pad_slices import normalize_slices
from ..ops.q3r_apply import q3r_stack_step_
from ..ops.truncated_svd import svd_path
from . import sharded as _sharded
from .config import Q3RConfig
from .operator import (
    _EXACT_COLD_DIM,
    _K_ROUND,
    _KEEP_ULPS,
    _REFINE_ROUNDS,
    _SKETCH_CACHE_ELEMENTS,
    _WIDEN_MARGIN,
    EPS_START,
    Rank,
    _factors,
    _op_stacks,
    _Operator,
    _reweights,
    _ritz_residuals,
    _sketched_svd,
    _slice_batches,
    resolve_rank,
)

__all__ = ["EPS_START", "Q3R", "TargetMap", "extract_linear", "resolve_rank"]

# Most weight elements stacked into one batched SVD call during a rebuild (the stack is a copy).
_BATCH_ELEMENTS = 1 << 25
# A rebuild's full SVDs of different shapes share one call, each matrix zero-padded to the call's largest shape
# (:func:`_pad_targets`), while the padded elements stay within this factor of the real ones.
_PAD_FACTOR = 4
# A rebuild's Ritz residual ||X v_i - s_i u_i|| may exceed rebuild_tol * s_i by this many units of roundoff of
# sigma_1 (the residual of an exact triplet is roundoff, not zero).
_RESIDUAL_ULPS = 64
# Whether the CPU reference path of the step stacks operators of transposed shapes together (the GPU and the Triton
# path do: one set of launches fewer). Off: on the CPU the transposed copy into the stack and the transposed add
# back cost more than the calls they save (for ViT-Tiny's fc1/fc2 about a quarter of an AdamW step).
_CPU_TRANSPOSED = False
# Most weight elements per stack on that CPU reference path: its products then run on chunks that stay in cache
# between the five products of a step (ViT-Tiny, 1 thread: ~20% less time than one stack of 1.8M elements). A
# GPU runs each stack whole (_BATCH_ELEMENTS, a memory cap): its launches, not its caches, set its time.
_CPU_STEP_ELEMENTS = 1 << 19
# Device types whose per-step factors are computed for same-shape operators together (batched products: a
# few kernels instead of ~8 per operator). Not the CPU: there the stack copy and bmm cost more than they
# save (about 20% slower for ViT-Tiny's 72 operators).
_BATCHED_FACTORS = {"cuda"}


# ------------------------------------------------------------------------------------------ extract_linear
class TargetMap(dict):
    """What :func:`extract_linear` returns: a dict ``{module: slices or None}`` that also knows each module's
    name in its model (``names``), which :class:`Q3R` uses in messages and :meth:`Q3R.stats`."""

    def __init__(self, *args, names: Mapping[nn.Module, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.names: dict[nn.Module, str] = dict(names or {})


def extract_linear(model: nn.Module, target_modules: str | Sequence[str] | None = None,
                   fused: Mapping[str, int | Sequence[Sequence[int]]] | None = None) -> TargetMap:
    """The ``{module: slices or None}`` mapping that :class:`Q3R` and ``AdamQ3R`` take.

    Args:
        model: any module. Selected submodules must have a 2-D ``weight``: ``nn.Linear`` (and subclasses),
            stored ``(out, in)``, or transformers' ``Conv1D`` (GPT-2 family), stored ``(in, out)``; Q3R reads
            the latter through its transpose, so ranks, slices and operators always refer to the ``(out, in)``
            orientation.
        target_modules: ``None`` selects every ``nn.Linear`` and ``Conv1D``; a string is a regex matched against
            the full module name; a list of strings matches names equal to or ending in ``"." + item`` (as PEFT).
        fused: ``{name: n}`` splits the output features of the matching modules into ``n`` equal slices
            (``{"qkv": 3}``, or GPT-2's ``{"c_attn": 3}``: Q, K and V), ``{name: [(start, stop), ...]}`` gives the
            slices of output features explicitly (rows of an ``nn.Linear`` weight, columns of a ``Conv1D`` one).
            Names match as in a ``target_modules`` list; each key must match at least one selected module.

    Returns:
        a :class:`TargetMap` (an ordered dict, module order of ``model.named_modules()``) of module -> ``None``
        (regularise the whole weight) or a list of ``(start, stop)`` output-feature slices (one operator per
        slice); its ``names`` map each module to its name in ``model``.
    """
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules must be a regex string or a non-empty list of names, got "
                             f"{target_modules!r}")
    fused = dict(fused or {})
    out = TargetMap()
    used_keys: set[str] = set()
    for name, module in model.named_modules():
        if target_modules is None:
            if not is_linear_like(module):
                continue
        elif not name or not matches_target(name, target_modules):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"target module {name!r} ({type(module).__name__}) has no 2-D weight to regularise")
        slices = None
        for key, spec in fused.items():
            if matches_target(name, [key]):
                used_keys.add(key)
                slices = fused_slices(name, spec, linear_weight(module).shape[0])
        out[module] = slices
        out.names[module] = name
    if not out:
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={target_modules!r}")
    unused = sorted(set(fused) - used_keys)
    if unused:
        raise ValueError(f"fused keys {unused} match no selected module (target_modules={target_modules!r})")
    return out


def _chunks(items: list, elements: int) -> list[list]:
    """``items`` in runs whose stacked weights (``elements`` each) stay within ``_BATCH_ELEMENTS``."""
    per = max(1, _BATCH_ELEMENTS // max(1, elements))
    return [items[c:c + per] for c in range(0, len(items), per)]


class _Run:
    """One batched SVD of a rebuild: ``items`` ``[(index, op, X, k), ...]``, their stacked weights ``Xs (b, m, n)``
    (None for the runs of a padded full SVD, :func:`_padded_svd`, which are never checked nor refined), the
    triplets ``U (b, m, k)``, ``S (b, k)``, ``Vh (b, k, n)``, the Ritz residual norms ``res (b, k)`` (None when
    not checked), and, once :func:`_read_back` ran, host copies ``host_s`` and ``host_res`` (lists per matrix)."""

    def __init__(self, items, Xs, k, U, S, Vh, res, ok: torch.Tensor | None = None):
        self.items, self.Xs, self.k, self.U, self.S, self.Vh, self.res = items, Xs, k, U, S, Vh, res
        # the randomized method's convergence flag (0-d bool, on the device) when its host check was deferred to
        # the rebuild's one read; host_ok is that read's value (None: nothing to check)
        self.ok, self.host_ok = ok, None
        self.host_s: list | None = None
        self.host_res: list | None = None

    def replace(self, j: int, other: _Run, jj: int) -> None:
        """Matrix ``j``'s triplets (device and host) <- matrix ``jj`` of ``other`` (same shape and ``k``)."""
        self.U[j], self.S[j], self.Vh[j] = other.U[jj], other.S[jj], other.Vh[jj]
        self.host_s[j] = other.host_s[jj]
        if self.host_res is not None:
            self.host_res[j] = None if other.host_res is None else other.host_res[jj]


def _read_back(runs: list[_Run], extra: Sequence[torch.Tensor] = ()) -> list[float]:
    """Host copies of every run's ``S`` and ``res``: one read per device for all of them.

    ``extra``: tensors of the caller's to read in the same host read (their device's); returns their values,
    each flattened, concatenated in order, as floats (fp64)."""
    by_device: dict = {}
    for run in runs:
        by_device.setdefault(run.S.device, ([], []))[0].append(run)
    for j, t in enumerate(extra):
        by_device.setdefault(t.device, ([], []))[1].append(j)
    extra_values: list[list[float]] = [[] for _ in extra]
    for group, extras in by_device.values():
        parts = [t.to(torch.float64).flatten() for run in group for t in (run.S, run.res, run.ok) if t is not None]
        parts += [extra[j].detach().to(torch.float64).flatten() for j in extras]
        values, pos = torch.cat(parts).tolist(), 0  # the one host sync
        for run in group:
            b, k = run.S.shape
            rows = [values[pos + j * k:pos + (j + 1) * k] for j in range(b)]
            run.host_s, pos = rows, pos + b * k
            if run.res is not None:
                run.host_res, pos = [values[pos + j * k:pos + (j + 1) * k] for j in range(b)], pos + b * k
            if run.ok is not None:
                run.host_ok, pos = values[pos] != 0.0, pos + 1
        for j in extras:
            extra_values[j], pos = values[pos:pos + extra[j].numel()], pos + extra[j].numel()
    return [v for vals in extra_values for v in vals]


def _raise_if_nonfinite(work: list) -> None:
    """``ValueError`` naming the first operator of ``work`` (``[(index, op, X, k)]``) whose ``X`` holds NaN/Inf."""
    finite = finite_flags([X for _, _, X, _ in work])
    if not all(finite):
        raise ValueError(f"Q3R: the weight of {work[finite.index(False)][1].name} contains NaN or Inf")


def _by_shape(pairs: list[tuple[_Run, int]]) -> dict[tuple, list[tuple[_Run, int]]]:
    """``(run, j)`` pairs grouped by ``(m, n, k, dtype, device)`` of matrix ``j`` of ``run`` (for batched calls)."""
    out: dict[tuple, list] = {}
    for run, j in pairs:
        _, m, n = run.Xs.shape
        out.setdefault((m, n, run.k, run.Xs.dtype, run.Xs.device), []).append((run, j))
    return out


def _pad_targets(counts: Mapping[tuple[int, int], int]) -> dict[tuple[int, int], tuple[int, int]]:
    """The padded shape ``(M, N)`` each tall shape ``(m, n)`` (``m >= n``) of ``counts`` (how many operators have
    it) takes in a rebuild's full SVD: the shapes are merged, largest first, while a merged call's padded elements
    stay within ``_PAD_FACTOR`` times its real ones; shapes with the same target share one ``torch.linalg.svd``.

    Computed from all of a :class:`Q3R`'s operators, not from those one rebuild or one process happens to
    hold, so a matrix is padded alike in every rebuild and on every process (the SVD's rounding depends on
    the padded shape; DDP's results must equal one process's to the bit). Every call costs a host sync (the
    ``info`` check of LAPACK's/cuSOLVER's SVD), so one call instead of one per shape is what keeps a
    rebuild's syncs fixed."""
    order = sorted(counts, key=lambda mn: (-mn[0] * mn[1], -mn[0]))
    targets, merged, M, N, count, real = {}, [], 0, 0, 0, 0
    for mt, nt in order:
        b = counts[(mt, nt)]
        M2, N2 = max(M, mt), max(N, nt)
        if merged and (count + b) * M2 * N2 <= _PAD_FACTOR * (real + b * mt * nt):
            merged.append((mt, nt))
            M, N, count, real = M2, N2, count + b, real + b * mt * nt
        else:
            targets.update((shape, (M, N)) for shape in merged)
            merged, M, N, count, real = [(mt, nt)], mt, nt, b, b * mt * nt
    targets.update((shape, (M, N)) for shape in merged)
    return targets


def _padded_svd(groups: list[tuple], M: int, N: int) -> list[_Run]:
    """One ``torch.linalg.svd`` for the groups ``[(m, n, k, items), ...]`` (one :class:`_Run` each, of ``k``
    triplets: at least as many as any of its items asks for), every matrix zero-padded to ``(M, N)``.

    Matrix ``X (m, n)`` enters as ``X`` (``m >= n``) or ``X^T``, zero-padded to ``(M, N)``: padding adds only
    zero singular values, and the singular vectors of the nonzero ones are zero in the padded rows and columns,
    so the top ``k`` triplets are ``X``'s (to rounding) once the padding is cut off; a transposed one swaps its
    ``U`` and ``V``. (Were ``X`` of rank below ``k``, its triplets with ``sigma = 0`` could point into the
    padding: they are never kept, ``sigma > eps`` being required.) Per group the runs hold views of the call's
    results truncated to the largest ``k`` (one copy each of ``U`` and ``Vh``, so the kept views do not hold
    the whole SVD alive), ``Vh`` made row-major per group (``set_triplets`` takes its rows as they are); the
    stacked weights ``Xs`` are not kept (None: these runs are exact and never checked nor refined).
    """
    views = [X if m >= n else X.T for m, n, _, items in groups for _, _, X, _ in items]
    if all(tuple(v.shape) == (M, N) for v in views):
        P = torch.stack(views)
    else:
        with warnings.catch_warnings():  # torch's strided nested tensors warn that they are a prototype
            warnings.simplefilter("ignore", UserWarning)
            P = torch.nested.nested_tensor(views).to_padded_tensor(0.0, output_size=(len(views), M, N))
    U, S, Vh = torch.linalg.svd(P, full_matrices=False)
    kc = max(k for _, _, k, _ in groups)
    U, Vh = U[..., :kc].contiguous(), Vh[:, :kc].contiguous()
    runs, p = [], 0
    for m, n, k, items in groups:
        q = p + len(items)
        if m >= n:
            Ug, Vhg = U[p:q, :m, :k], Vh[p:q, :k, :n]
        else:
            Ug, Vhg = Vh[p:q, :k, :m].transpose(1, 2), U[p:q, :n, :k].transpose(1, 2)
        runs.append(_Run(items, None, k, Ug, S[p:q, :k], Vhg.contiguous(), None))
        p = q
    return runs


# ------------------------------------------------------------------------------------------------ Q3R
class Q3R:
    """The Q3R regularizer over a set of weights (see the module docstring for the maths and the rebuilds).

    Args:
        trainable_modules: ``{module: None | [(start, stop), ...]}`` as returned by :func:`extract_linear`
            (an iterable of modules means ``None`` for each). Each whole weight or each slice of output features
            gets one operator.
        target_rank, lmbda: see :class:`Q3RConfig`; required unless ``config`` is given.
        config: a :class:`Q3RConfig` (or a mapping of its fields) holding every setting below.
        group: process group; when ``torch.distributed`` is initialised the operators are split over its
            ranks by cost ``m * n * r`` and their states shared after every rebuild (two all-reduces).
        **settings: any other :class:`Q3RConfig` field (``steps``, ``epsilon_schedule``, ``N``, ``eps_min``,
            ``epsilon``, ``oversample``, ``n_iter``, ``warm_start``, ``rebuild_tol``, ``seed``); these and
            ``target_rank``/``lmbda`` override the fields of ``config``. An unknown name raises ``TypeError``, a
            bad value ``ValueError`` naming it (:class:`Q3RConfig` validates).

    ``warm_start=False`` makes every rebuild a cold :func:`ops.truncated_svd` from the operator's seeded sketch
    with ``n_iter`` iterations (then checked like a warm one); ``rebuild_tol=None`` turns the a-posteriori check
    off. :attr:`last_rebuild` counts what the last rebuild did (``operators``, ``checked``, ``refined``,
    ``exact``, ``failed``); :meth:`stats` reports each operator's kept triplets.

    Before the first rebuild (and for an operator whose rank r >= min(m, n), which is warned about once)
    no triplet is kept and Q3R reduces to weight decay ``lmbda ||X||^2``.
    """

    def __init__(self, trainable_modules: Mapping[nn.Module, Sequence[Sequence[int]] | None] | Iterable[nn.Module],
                 target_rank: Rank | Sequence[Rank] | None = None, lmbda: float | None = None, *,
                 config: Q3RConfig | Mapping | None = None, group=None, **settings):
        if not isinstance(trainable_modules, Mapping):
            trainable_modules = {m: None for m in trainable_modules}
        if not trainable_modules:
            raise ValueError("trainable_modules is empty: nothing to regularise")
        # None is "not given" for the settings that have no None meaning (AdamQ3R forwards its own defaults)
        named = (("target_rank", target_rank), ("lmbda", lmbda), ("steps", settings.pop("steps", None)))
        given = {k: v for k, v in named if v is not None}
        if config is None:
            for name in ("target_rank", "lmbda"):
                if name not in given:
                    raise ValueError(f"{name} is required: pass {name}=... or config=Q3RConfig(...)")
        self.config = cfg = Q3RConfig.merged(config, **given, **settings)
        self.lmbda, self.steps, self.schedule = float(cfg.lmbda), int(cfg.steps), cfg.epsilon_schedule
        self.N, self.eps_min, self.epsilon = cfg.N, float(cfg.eps_min), cfg.epsilon
        self.oversample, self.n_iter, self.seed, self.group = int(cfg.oversample), int(cfg.n_iter), int(cfg.seed), group
        self.warm_start, self.rebuild_tol = cfg.warm_start, cfg.rebuild_tol
        target_rank = cfg.target_rank
        self.ops: list[_Operator] = []
        self._build(trainable_modules, target_rank)
        self.t, self.t0, self.n_refresh = 0, None, 0
        self.last_rebuild: dict[str, int] = {}
        self._owners: list[int] | None = None
        self._stacks: list | None = None
        self._batches: dict | None = None
        self._sketches: dict = {}

    def _build(self, modules, target_rank) -> None:
        names = getattr(modules, "names", {})  # extract_linear's mapping knows the module names
        entries = []
        for i, (module, slices) in enumerate(modules.items()):
            w = getattr(module, "weight", module)
            if not isinstance(w, torch.Tensor) or w.dim() != 2:
                raise ValueError(f"trainable module {i} ({type(module).__name__}) has no 2-D weight")
            flip = is_conv1d(module)  # weight (in, out): operators on its transpose, slices of output features
            module_name = names.get(module)
            where = f"{module_name!r}" if module_name else f"module {i}"
            label = f"{where} {type(module).__name__} {tuple(w.shape)}"
            if slices is None:
                entries.append((w, None, label, flip, module_name))
            else:
                axis = "columns" if flip else "rows"
                for s in normalize_slices(slices, w.shape[1] if flip else w.shape[0]):
                    entries.append((w, s, f"{label} {axis} {s[0]}:{s[1]}", flip, module_name))
        if isinstance(target_rank, (list, tuple)):
            if len(target_rank) != len(entries):
                raise ValueError(f"target_rank has {len(target_rank)} entries for {len(entries)} operators "
                                 f"(one per matrix or slice)")
            specs = list(target_rank)
        else:
            specs = [target_rank] * len(entries)
        for j, ((w, rows, name, flip, module_name), spec) in enumerate(zip(entries, specs, strict=True)):
            m, n = (w.shape[1], w.shape[0]) if flip else w.shape
            m = m if rows is None else rows[1] - rows[0]
            rank = resolve_rank(spec, m, n, f"target_rank[{j}]")
            self.ops.append(_Operator(w, rows, rank, name, transposed=flip, module_name=module_name))
        full = [op.name for op in self.ops if op.rank >= min(op.m, op.n)]
        if full:
            warnings.warn(f"Q3R: target rank >= number of singular values for {full}; these operators keep no "
                          "triplet and act as plain weight decay", stacklevel=3)

    # ----------------------------------------------------------------------------------------- updates
    @property
    def params(self) -> list[torch.Tensor]:
        """The regularised weights, each once, in operator order."""
        return list({id(op.weight): op.weight for op in self.ops}.values())

    def update(self, force: bool = False, reads: Sequence[torch.Tensor] = ()) -> bool:
        """Count one training step; rebuild every operator on the first call and every ``steps`` calls.

        Returns whether the operators were rebuilt. ``reads``: see :meth:`refresh`; their values are left in
        ``last_reads`` (empty when there was no rebuild, and nothing is read then).
        """
        self.t += 1
        self.last_reads: list[float] = []
        if force or (self.t - 1) % self.steps == 0:
            # refresh() without arguments when there is nothing to read (callers may wrap it)
            if reads:
                self.last_reads = self.refresh(reads)
            else:
                self.refresh()
            return True
        return False

    @torch.no_grad()
    def refresh(self, reads: Sequence[torch.Tensor] = ()) -> list[float]:
        """Rebuild the operators from the current weights (this rank's share when distributed).

        ``reads``: tensors of the caller's (e.g. an optimizer's found-inf flags) whose values the rebuild's one
        host read of all sigma fetches too, saving the caller its own host sync; returns them (each flattened,
        concatenated, as floats; read separately only where this process rebuilds nothing on their device).
        """
        if self.t0 is None:
            self.t0 = self.t
        me, dist_on = _dist.rank(self.group), _dist.is_distributed(self.group)
        if dist_on and self._owners is None:
            costs = [op.m * op.n * (op.rank + 1) for op in self.ops]
            self._owners = _dist.balanced_assignment(costs, _dist.world_size(self.group))
        # FSDP2 (DTensor) weights: every process rebuilds its rows of each of their operators (q3r/sharded.py)
        items = _sharded.refresh(self, [(i, op) for i, op in enumerate(self.ops)
                                        if not dist_on or self._owners[i] == me])
        # _refresh_ops(items) alone when there is nothing to read (callers and tests may wrap it)
        values = self._refresh_ops(items, reads) if reads else (self._refresh_ops(items), [])[1]
        if dist_on:
            _sharded.share_states(self, me)
        self.n_refresh += 1
        self._stacks = self._batches = None
        return values

    def _seed(self, i: int) -> int:
        # one sketch per operator for the whole run: with a new draw per rebuild, the default schedule's
        # eps = min(eps, sigma_{r+1}) would ratchet down on the estimation noise alone (the kept count of a weight
        # held fixed would creep up from rebuild to rebuild)
        return (self.seed * 1_000_003 + i * 7919) % (2**63)

    def _refresh_ops(self, items: list[tuple[int, _Operator]], reads: Sequence[torch.Tensor] = ()) -> list[float]:
        """Rebuild the operators ``items`` (index, operator); same-shape ones share batched SVD calls.

        The full (LAPACK/cuSOLVER) SVDs, exact first rebuilds and every shape up to ``SMALL_DIM``, of all shapes
        share one call per padded shape (:func:`_pad_targets`; usually a single one), since every such call
        checks its ``info`` on the host. The ViT-like set (qkv slices, proj, fc1, fc2 at ``d <= 128``) thus
        costs two host syncs per rebuild at any depth: that call and the one read of all sigma. Randomized
        rebuilds add their own (:func:`ops.truncated_svd`); a refinement adds syncs only when an operator
        fails the check, widening only when a kept count outgrows the triplets computed.

        A weight with NaN/Inf raises ``ValueError`` naming its operator before any operator changes: it makes the
        SVD fail or its sigma non-finite, which the one host read of all sigma sees (no separate pass).
        Returns the values of ``reads``, fetched in that read (:meth:`refresh`).
        """
        work = []
        for i, op in items:
            kmax = min(op.m, op.n)
            if op.rank < kmax:  # else: no triplet is ever kept (warned at construction)
                # start from the last kept count (+ margin): eps lagging sigma_{r+1} keeps more than r triplets,
                # and a second, wider SVD per rebuild would cost as much again (see _WIDEN_MARGIN, _K_ROUND)
                k = min(kmax, -(-(max(op.rank, op.k) + 1 + _WIDEN_MARGIN) // _K_ROUND) * _K_ROUND)
                work.append((i, op, op.view(op.weight.detach()).to(op.cdtype), k))
        if not work:
            self.last_rebuild = {"operators": 0, "checked": 0, "refined": 0, "exact": 0, "failed": 0}
            return _read_back([], reads)
        groups: dict[tuple, list] = {}
        for item in work:
            i, op, X, k = item
            groups.setdefault((op.m, op.n, k, X.dtype, X.device, self._svd_mode(op)), []).append(item)
        # every SVD first, then one host read of all their sigma and Ritz residuals
        runs, full, run_modes = [], {}, {}
        try:
            for (m, n, k, dtype, device, mode), members in groups.items():
                if mode == "exact" or svd_path((m, n), k, self.oversample) == "full":
                    # LAPACK's SVD: the groups of a dtype, device and padded shape in one call (_pad_targets)
                    M, N = self._pad_target(m, n, dtype, device)
                    full.setdefault((dtype, device, M, N), []).append((m, n, k, members))
                    continue
                for chunk in _chunks(members, m * n):  # the stack is a copy of the weights
                    Xs = torch.stack([X for _, _, X, _ in chunk])
                    # the randomized method's convergence check is read with all sigma (below), not on its own
                    U, S, Vh, ok = self._svd(Xs, k, [i for i, *_ in chunk], mode, [op.basis for _, op, _, _ in chunk],
                                             deferred=True)
                    res = _ritz_residuals(Xs, U, S, Vh) if self._checked(mode, m, n, k) else None
                    runs.append(_Run(chunk, Xs, k, U, S, Vh, res, ok))
                    run_modes[id(runs[-1])] = mode
            for (_, _, M, N), parts in full.items():
                per = max(1, _BATCH_ELEMENTS // (M * N))  # the padded stack is a copy of the weights
                pieces = [(m, n, k, item) for m, n, k, items in parts for item in items]
                for c in range(0, len(pieces), per):
                    chunk: dict[tuple, list] = {}  # one run per shape: each item keeps its own k (_settle_run)
                    for m, n, _, item in pieces[c:c + per]:
                        chunk.setdefault((m, n), []).append(item)
                    runs.extend(_padded_svd([(m, n, max(it[3] for it in items), items)
                                             for (m, n), items in chunk.items()], M, N))
            values = _read_back(runs, reads)
        except (RuntimeError, ValueError):  # torch.linalg.LinAlgError is a RuntimeError
            _raise_if_nonfinite(work)
            raise
        if not all(math.isfinite(v) for run in runs for row in run.host_s for v in row):
            _raise_if_nonfinite(work)
        self._repeat_unconverged([run for run in runs if run.host_ok is False], run_modes)
        self.last_rebuild = {"operators": len(work), "checked": sum(len(r.items) for r in runs if r.res is not None),
                             "refined": 0, "exact": 0, "failed": 0}
        self._refine(runs)
        for run in runs:
            self._settle_run(run)
        return values

    def _repeat_unconverged(self, runs: list[_Run], modes: dict[int, str]) -> None:
        """Repeat the randomized SVDs of ``runs`` whose deferred convergence check failed (rare: a basis that
        lost orthonormality, e.g. a rank-deficient weight under Cholesky-QR) with :func:`ops.truncated_svd`'s
        own checks and fallbacks (Householder QR, then the full SVD): the results :func:`ops.truncated_svd`
        would have given. Costs host syncs, but only when a check failed."""
        if not runs:
            return
        for run in runs:
            m, n = run.Xs.shape[1:]
            mode = modes[id(run)]
            run.U, run.S, run.Vh = self._svd(run.Xs, run.k, [i for i, *_ in run.items], mode,
                                             [op.basis for _, op, _, _ in run.items])
            run.res = _ritz_residuals(run.Xs, run.U, run.S, run.Vh) if self._checked(mode, m, n, run.k) else None
            run.ok = None
        _read_back(runs)

    def _pad_target(self, m: int, n: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
        """The padded tall shape an ``(m, n)`` full SVD of ``dtype`` on ``device`` takes (:func:`_pad_targets` of
        all operators, made once); a shape no operator has (not expected) is not padded."""
        plans = self.__dict__.setdefault("_pad_plans", {})
        if (dtype, device) not in plans:
            counts: dict[tuple[int, int], int] = {}
            for op in self.ops:
                if op.cdtype == dtype and op.weight.device == device:
                    shape = (max(op.m, op.n), min(op.m, op.n))
                    counts[shape] = counts.get(shape, 0) + 1
            plans[(dtype, device)] = _pad_targets(counts)
        shape = (max(m, n), min(m, n))
        return plans[(dtype, device)].get(shape, shape)

    def _checked(self, mode: str, m: int, n: int, k: int) -> bool:
        """Whether a rebuild's triplets get the a-posteriori check: randomized ones (warm or cold), not exact SVDs."""
        return (self.rebuild_tol is not None and mode != "exact"
                and svd_path((m, n), k, self.oversample) == "randomized")

    def _failing(self, op: _Operator, host_s: list[float], host_res: list[float]) -> bool:
        """Whether a Ritz residual of a triplet that will be kept, or that sets eps (``sigma_{r+1}``), exceeds
        ``rebuild_tol * sigma_i`` (plus roundoff of ``sigma_1``)."""
        eps, _ = self._next_eps(op, host_s[op.rank])
        cut = eps + _KEEP_ULPS * torch.finfo(op.cdtype).eps * host_s[0]
        count = max(op.rank + 1, sum(1 for v in host_s if v > cut))
        slack = _RESIDUAL_ULPS * torch.finfo(op.cdtype).eps * host_s[0]
        return any(r > self.rebuild_tol * s + slack for s, r in zip(host_s[:count], host_res[:count], strict=True))

    def _refine(self, runs: list[_Run]) -> None:
        """Refine the operators whose rebuild failed the check (:meth:`_failing`), batched per shape.

        Up to ``_REFINE_ROUNDS`` rounds of ``max(1, n_iter)`` subspace iterations started from the failed
        rebuild's own right vectors (one host read per round, to learn which still fail), then the exact SVD of
        those left with ``min(m, n) <= 1024``; beyond that size one still failing is kept as it is, with a
        ``RuntimeWarning``. The results replace the failed ones in ``runs`` in place."""
        failed = [(run, j) for run in runs if run.res is not None
                  for j, (_, op, _, _) in enumerate(run.items) if self._failing(op, run.host_s[j], run.host_res[j])]
        self.last_rebuild["refined"] = len(failed)
        for _ in range(_REFINE_ROUNDS):
            if not failed:
                return
            redo = []
            for (m, n, k, *_), members in _by_shape(failed).items():
                for part in _chunks(members, m * n):
                    Xs = torch.stack([run.Xs[j] for run, j in part])
                    U, S, Vh = _sketched_svd(Xs, k, [self._seed(run.items[j][0]) for run, j in part], self.oversample,
                                             max(1, self.n_iter), self._sketches, _SKETCH_CACHE_ELEMENTS,
                                             [run.Vh[j] for run, j in part])
                    redo.append((part, _Run(None, Xs, k, U, S, Vh, _ritz_residuals(Xs, U, S, Vh))))
            _read_back([r for _, r in redo])
            failed = []
            for part, new in redo:
                for jj, (run, j) in enumerate(part):
                    run.replace(j, new, jj)
                    if self._failing(run.items[j][1], new.host_s[jj], new.host_res[jj]):
                        failed.append((run, j))
        exact = [(run, j) for run, j in failed if min(run.items[j][1].m, run.items[j][1].n) <= _EXACT_COLD_DIM]
        late = [run.items[j][1].name for run, j in failed
                if min(run.items[j][1].m, run.items[j][1].n) > _EXACT_COLD_DIM]
        self.last_rebuild["exact"], self.last_rebuild["failed"] = len(exact), len(late)
        if late:
            warnings.warn(f"Q3R: the rebuilt triplets of {late} still have Ritz residuals above rebuild_tol="
                          f"{self.rebuild_tol} after {_REFINE_ROUNDS} refinements; kept as they are", RuntimeWarning,
                          stacklevel=4)
        redo = []
        for (m, n, k, *_), members in _by_shape(exact).items():
            for part in _chunks(members, m * n):
                Xs = torch.stack([run.Xs[j] for run, j in part])
                U, S, Vh = self._svd(Xs, k, [], "exact", [])
                redo.append((part, _Run(None, Xs, k, U, S, Vh, None)))
        _read_back([r for _, r in redo])
        for part, new in redo:
            for jj, (run, j) in enumerate(part):
                run.replace(j, new, jj)

    def _svd_mode(self, op: _Operator, warm: bool = True) -> str:
        """How ``op``'s next SVD is taken (see :meth:`_svd`); ``warm=False``: a cold one (widening)."""
        if self.warm_start and warm and op.basis is not None:
            return "warm"
        return "exact" if self.warm_start and min(op.m, op.n) <= _EXACT_COLD_DIM else "sketch"

    def _svd(self, X: torch.Tensor, k: int, idx: list[int], mode: str, bases: list, deferred: bool = False) -> tuple:
        """Top-``k`` triplets of the stack ``X (b, m, n)`` of operators ``idx``: ``mode`` is ``"exact"`` (full
        SVD), ``"sketch"`` (cold randomized, ``n_iter``) or ``"warm"`` (one product with ``bases``).
        ``deferred=True``: a fourth result, the randomized method's convergence flag on the device (None for a
        full SVD), instead of its host check (:func:`~lowrank_kernels.ops.truncated_svd.truncated_svd_deferred`)."""
        if mode == "exact" or svd_path(X.shape, k, self.oversample) == "full":  # small: the SVD is as cheap
            U, S, Vh = torch.linalg.svd(X, full_matrices=False)
            # row-major copies of the top k: the kept views (and the basis) must not hold the whole SVD alive, and
            # the kept rows of Vh are then contiguous slices
            out = U[..., :k].contiguous(), S[..., :k].contiguous(), Vh[..., :k, :].contiguous()
            return (*out, None) if deferred else out
        warm = mode == "warm"
        return _sketched_svd(X, k, [self._seed(i) for i in idx], self.oversample, 0 if warm else self.n_iter,
                             self._sketches, _SKETCH_CACHE_ELEMENTS, bases if warm else None, deferred=deferred)

    def _settle_run(self, run: _Run) -> None:
        """:meth:`_settle` for every operator of ``run``, with the reweights ``d`` of the whole run computed in one
        batched expression (the kept triplets and ``d`` are then slices of the run's tensors)."""
        for j, (_, op, _, _) in enumerate(run.items):
            op.eps, op.eps0 = self._next_eps(op, run.host_s[j][op.rank])
        eps = torch.tensor([op.eps for _, op, _, _ in run.items], dtype=run.S.dtype).to(run.S.device)
        d = _reweights(eps[:, None], run.S)
        for j, (i, op, X, k) in enumerate(run.items):  # a run of a padded SVD may hold more than k triplets
            self._settle(i, op, X, k, run.U[j][:, :k], run.S[j][:k], run.Vh[j][:k], run.host_s[j][:k], d[j][:k])

    def _settle(self, i: int, op: _Operator, X: torch.Tensor, k: int, U, S, Vh, host_s: list[float],
                d: torch.Tensor) -> None:
        """Keep the triplets above ``op.eps`` (already moved by the schedule), widening the SVD while its last sigma
        is still above eps; ``d`` holds the reweights of ``S``."""
        # a sigma within rounding of eps is not above it: re-estimating the same sigma_{r+1} one ulp higher (warm
        # rebuilds of an unchanged weight did) must not keep one more triplet (whose d would be ~0 anyway)
        cut = op.eps + _KEEP_ULPS * torch.finfo(op.cdtype).eps * host_s[0]
        kmax = min(op.m, op.n)
        # every triplet above eps matters: widen until one falls below it (cold: the old basis is too narrow)
        while k < kmax and host_s[-1] > cut:
            k = min(2 * k, kmax)
            U, S, Vh = (t[0] for t in self._svd(X[None], k, [i], self._svd_mode(op, warm=False), [None]))
            host_s, d = S.tolist(), None
        keep = sum(1 for v in host_s if v > cut)
        op.basis = Vh if self.warm_start else None
        op.set_triplets(U[:, :keep], S[:keep], Vh[:keep], None if d is None else d[:keep])

    def _next_eps(self, op: _Operator, sigma: float) -> tuple[float, float | None]:
        """``(eps, eps0)`` of ``op``'s rebuild whose ``sigma_{r+1}`` is ``sigma``: the schedule's new eps and its
        anchor (set at the first rebuild); nothing is stored here."""
        eps0 = op.eps0
        if self.schedule == "default":
            return min(op.eps, sigma), eps0
        if self.schedule == "exploration":
            return sigma, eps0
        if self.schedule == "constant":
            if eps0 is None:
                eps0 = float(self.epsilon) if self.epsilon is not None else sigma
            return eps0, eps0
        if eps0 is None:
            eps0 = max(sigma, 1e-30)
        frac = min((self.t - self.t0) / self.N, 1.0)
        return eps0 * (self.eps_min / eps0) ** frac, eps0

    def _share_states(self, me: int) -> None:
        """Owner -> everyone: sizes and eps first (fp64), then the triplets and the warm-start bases in one
        flat all-reduce (every rank then holds every operator's state, as a single process would)."""
        meta = torch.zeros(len(self.ops), 4, dtype=torch.float64)
        for i, op in enumerate(self.ops):
            if self._owners[i] == me:
                meta[i] = torch.tensor([op.k, op.eps, -1.0 if op.eps0 is None else op.eps0,
                                        -1.0 if op.basis is None else op.basis.shape[0]], dtype=torch.float64)
        meta = meta.to(self.ops[0].weight.device)
        _dist.flat_all_reduce([meta], group=self.group)
        meta = meta.cpu().tolist()
        bufs = []
        for i, op in enumerate(self.ops):
            k, kb = int(meta[i][0]), int(meta[i][3])
            kw = dict(dtype=op.cdtype, device=op.weight.device)
            if self._owners[i] == me:
                bufs.append([op.U.clone(), op.S.clone(), op.Vh.clone()] + ([] if kb < 0 else [op.basis.clone()]))
            else:
                bufs.append([torch.zeros(op.m, k, **kw), torch.zeros(k, **kw), torch.zeros(k, op.n, **kw)]
                            + ([] if kb < 0 else [torch.zeros(kb, op.n, **kw)]))
        _dist.flat_all_reduce([t for b in bufs for t in b], group=self.group)
        for i, op in enumerate(self.ops):
            op.eps, op.eps0 = meta[i][1], None if meta[i][2] < 0 else meta[i][2]
            op.set_triplets(*bufs[i][:3])
            op.basis = bufs[i][3] if len(bufs[i]) > 3 else None

    # ---------------------------------------------------------------------------------- value, gradient
    @property
    def val(self) -> torch.Tensor:
        """``sum_ops lmbda <X, L X R>``, a differentiable scalar (fp32, or fp64 for fp64 weights)."""
        _sharded.refuse(self.ops, "val")
        total = None
        for op in self.ops:
            v = op.value(op.view(op.weight).to(op.cdtype))
            total = v if total is None else total + v.to(total.dtype)
        return self.lmbda * total

    @torch.no_grad()
    def factors(self) -> dict[torch.Tensor, list[tuple[int, int, torch.Tensor | None, torch.Tensor | None]]]:
        """Per weight: ``[(start, stop, A, B), ...]`` with ``G[start:stop] = 2 lmbda (X[start:stop] + A B)``.

        ``A (stop - start, 2k)`` and ``B (2k, n)`` (compute dtype) are ``None`` when no triplet is kept; rows
        outside every slice get no Q3R term. This is what :func:`ops.q3r_apply` consumes.
        """
        _sharded.refuse(self.ops, "factors")
        found = {}
        for op in self.ops:
            if op.weight.device.type not in _BATCHED_FACTORS:
                found[id(op)] = op.factors(op.view(op.weight).to(op.cdtype))
        for members, U, Vh, d in self._factor_stacks():
            # same-shape operators in batched products (one set of kernels per chunk on a GPU); the padded
            # columns of U, Vh and d are zero and add nothing
            A, B = _factors(torch.stack([op.view(op.weight).to(op.cdtype) for op in members]), U, Vh, d)
            for j, op in enumerate(members):
                found[id(op)] = (A[j], B[j])
        out: dict = {}
        for op in self.ops:
            rows = op.rows or (0, op.m)  # output features (rows of the transpose of a Conv1D weight)
            A, B = found.get(id(op), (None, None))
            out.setdefault(op.weight, []).append((rows[0], rows[1], A, B))
        return out

    def _factor_stacks(self) -> list[tuple[list[_Operator], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The kept triplets of same-shape operators stacked (zero-padded to the largest kept count), in chunks
        of at most ``_BATCH_ELEMENTS`` weight elements; built once per rebuild."""
        if self._stacks is None:
            self._stacks = {}
        if "factors" not in self._stacks:
            groups: dict[tuple, list[_Operator]] = {}
            for op in self.ops:
                if op.k and op.weight.device.type in _BATCHED_FACTORS:
                    groups.setdefault((op.m, op.n, op.cdtype, op.weight.device), []).append(op)
            stacks = self._stacks["factors"] = []
            for (m, n, dtype, device), members in groups.items():
                for chunk in _chunks(members, m * n):
                    K = max(op.k for op in chunk)
                    U = torch.zeros(len(chunk), m, K, dtype=dtype, device=device)
                    Vh = torch.zeros(len(chunk), K, n, dtype=dtype, device=device)
                    d = torch.zeros(len(chunk), K, dtype=dtype, device=device)
                    for j, op in enumerate(chunk):
                        U[j, :, :op.k], Vh[j, :op.k], d[j, :op.k] = op.U, op.Vh, op.d
                    stacks.append((chunk, U, Vh, d))
        return self._stacks["factors"]

    @torch.no_grad()
    def decoupled_step_(self, weight: torch.Tensor, lr: float, weight_decay: float = 0.0,
                        defer_scale: bool = False) -> float:
        """``weight <- (1 - lr weight_decay) weight - lr G(weight)`` in place, ``G`` evaluated at the old weight.

        ``G = 2 lmbda L X R`` on each operator's rows and 0 on rows outside every slice, as in
        :func:`ops.q3r_apply`, but without forming the factors: the operators of same-size adjacent slices
        (QKV) run as one batch of six products on a view of the weight. One weight at a time (launches grow with
        the number of weights): ``AdamQ3R`` runs :meth:`decoupled_steps_`, all weights in a fixed number of
        batched launches. ``weight`` (one of :attr:`params`) must be contiguous fp32/fp64.

        ``defer_scale=True`` leaves out the factor ``s = 1 - lr (weight_decay + 2 lmbda)`` that every row of the
        result carries (the weight ends ``1/s`` times the above) and returns ``s``, for a caller that scales the
        weight anyway: torch's AdamW kernels with ``weight_decay = (1 - s) / lr`` do it in their own pass (on the
        CPU a GEMM that also scales its output measured ~8% slower on these shapes). It is not deferred (and
        1.0 is returned) when ``s < 0.5``, where dividing by ``s`` would cost accuracy.
        """
        if _sharded.is_sharded(weight):  # FSDP2: this process's rows (q3r/sharded.py)
            return _sharded.decoupled_step_(self, weight, lr, weight_decay, defer_scale)
        if self._batches is None:
            self._batches = {}
        plan = self._batches.get(id(weight))
        if plan is None:
            ops_w = [op for op in self.ops if op.weight is weight]
            if not ops_w:
                raise ValueError(f"weight of shape {tuple(weight.shape)} is not regularised by this Q3R")
            plan = self._batches[id(weight)] = (*_slice_batches(ops_w, weight.shape[0]), ops_w[0].cdtype)
        batches, uncovered, cdtype = plan
        if not weight.is_contiguous() or weight.dtype != cdtype:
            raise ValueError(f"decoupled_step_ needs a contiguous fp32/fp64 weight, got {weight.dtype} with strides "
                             f"{weight.stride()}")
        c, base = 2.0 * self.lmbda * lr, 1.0 - lr * weight_decay
        scale = base - c if defer_scale and base - c >= 0.5 else 1.0
        # covered rows: base X - c L X R = (base - c) X - c (L X R - X); all of it divided by scale
        beta, alpha = (base - c) / scale, -c / scale
        for batch in batches:
            batch.step_(weight, alpha, beta)
        if base != scale:
            for s, e in uncovered:
                weight[s:e].mul_(base / scale)
        return scale

    @torch.no_grad()
    def decoupled_steps_(self, settings: Mapping, key: Callable[[torch.Tensor], object] | None = None,
                         keep: torch.Tensor | None = None, defer_scale: bool = False) -> dict[int, float]:
        """Every regularised weight ``w <- (1 - lr wd) w - lr G(w)`` in place, ``G`` evaluated at the old weights.

        ``(lr, wd) = settings[key(w)]`` (``key=None``: ``settings[None]``); a weight whose key is not in
        ``settings`` is left alone (AdamQ3R: no gradient this step). ``G = 2 lmbda L X R`` on each
        operator's rows, 0 on rows outside every slice (they only decay), as in :func:`ops.q3r_apply`.
        ``keep``: ``None``, or a 0-d fp32 tensor on the weights' device holding 1 (apply) or 0 (leave every
        weight unchanged), so a skip is decided on the device without a host sync.

        ``defer_scale=True`` leaves out the factor ``s = 1 - lr (wd + 2 lmbda)`` that every covered row carries
        (those weights end ``1/s`` times the above) for a caller that scales them anyway: torch's AdamW kernels
        with ``weight_decay = (1 - s) / lr`` do it in their own pass over the weight, so the Q3R step only adds
        ``-(lr / s) 2 lmbda (L X R - X)`` (on the CPU: 7 passes over the weights instead of 11). Not deferred
        where ``s < 0.5`` (dividing by ``s`` would cost accuracy). Returns ``{id(w): s}`` for the weights whose
        scale was deferred (empty without ``defer_scale``).

        The step AdamQ3R runs on every device: the operators are grouped into stacks by shape up to transpose,
        weight dtype, device and ``key`` (:func:`~.operator._op_stacks`, built once per rebuild), and each stack
        takes a fixed number of launches whatever its size: one copy of its weights, four batched thin
        products, then :func:`ops.q3r_apply.q3r_stack_step_` (the Triton kernel once where the backend picks
        Triton, else one batched product, the mask and one multi-tensor add). Rows outside every slice: one
        multi-tensor multiply per ``key``. No host sync, no host-to-device copy (but once after a rebuild or
        when a weight moved), no shape that depends on data: capturable in a CUDA graph.
        """
        _sharded.decoupled_steps_(self, settings, key, keep)  # FSDP2 weights: their rows, one all-reduce
        plan = self._step_plan(key)
        scales: dict = {}
        for k, (lr, wd) in settings.items():
            c, base = 2.0 * self.lmbda * lr, 1.0 - lr * wd
            scales[k] = (c, base, base - c if defer_scale and 0.5 <= base - c < 1.0 else 1.0)
        deferred: dict[int, float] = {}
        for stack in plan["stacks"]:
            if stack.key not in scales:
                continue
            c, base, scale = scales[stack.key]
            if scale != 1.0:
                deferred.update((id(op.weight), scale) for op in stack.ops)
            beta, alpha = (base - c) / scale, -c / scale
            if scale != 1.0:
                beta = 1.0  # (base - c) / scale, exactly
                if not stack.K:
                    continue  # nothing left to add: the scale is the caller's
            views = stack.views()
            X = stack.stacked(views)
            table = None
            if X.dtype == torch.float32 and backend.choose(X, op="q3r_apply") == "triton":
                table = stack.table(views)
            step_keep = keep
            if stack.K:
                # with beta = 1 the step is keep * alpha * (L X R - X): the reference masks the thin products
                # (small) instead of its (b, m, n) result; the kernel reads keep itself
                masked = beta == 1.0 and table is None and keep is not None
                stack.thin(X, keep if masked else None)
                step_keep = None if masked else keep
            q3r_stack_step_(views, X, stack.AT, stack.B, beta=beta, alpha=alpha, keep=step_keep, table=table)
        for (k, dtype), rows in plan["uncovered"].items():
            if k not in scales:
                continue
            _, base, _ = scales[k]
            factor = base / deferred.get(id(rows[0][0]), 1.0)
            if factor == 1.0:
                continue
            views = [w[s:e] for w, s, e in rows]
            if keep is None:
                torch._foreach_mul_(views, factor)
            else:  # the factor 1 + keep (factor - 1) in the compute dtype (fp32 would round an fp64 decay)
                wide = torch.promote_types(dtype, torch.float32)
                torch._foreach_mul_(views, (keep.to(wide) * (factor - 1.0)).add_(1.0))
        return deferred

    def _step_plan(self, key) -> dict:
        """The :meth:`decoupled_steps_` plan for ``key``: operator stacks and, per key, the rows outside every
        slice; rebuilt after a rebuild (``_stacks`` is reset) or when a weight's key changed."""
        keys = tuple(None if key is None else key(op.weight) for op in self.ops)
        transposed = (_CPU_TRANSPOSED or backend.requested_backend() == "triton"
                      or any(op.weight.device.type != "cpu" for op in self.ops))
        if self._stacks is None:
            self._stacks = {}
        plan = self._stacks.get("step")
        if plan is None or plan["keys"] != keys or plan["transposed"] != transposed:
            key_of = {id(op): k for op, k in zip(self.ops, keys, strict=True)}
            uncovered: dict = {}
            for w in _sharded.plain(self.params):  # sharded weights: _sharded.decoupled_steps_
                spans = sorted(op.rows or (0, w.shape[0]) for op in self.ops if op.weight is w)
                covered = 0
                k = key_of[id(next(op for op in self.ops if op.weight is w))]
                for s, e in spans + [(w.shape[0], w.shape[0])]:
                    if s > covered:
                        uncovered.setdefault((k, w.dtype), []).append((w, covered, s))
                    covered = max(covered, e)
            plan = {"keys": keys, "uncovered": uncovered, "transposed": transposed,
                    "stacks": _op_stacks(_sharded.plain(self.ops), lambda op: key_of[id(op)],
                                         _BATCH_ELEMENTS if transposed else _CPU_STEP_ELEMENTS, transposed)}
            self._stacks["step"] = plan
        return plan

    @property
    @torch.no_grad()
    def grad(self) -> dict[torch.Tensor, torch.Tensor]:
        """``{weight: dQ/dweight}`` (full weight shape, weight dtype); slices assembled by ``ops.pad_slices``."""
        out = {}
        flipped = {id(op.weight) for op in self.ops if op.transposed}
        for weight, parts in self.factors().items():
            w = weight.t() if id(weight) in flipped else weight  # Conv1D: the (out, in) view
            blocks = []
            for start, stop, A, B in parts:
                X = w[start:stop].to(A.dtype if A is not None else torch.promote_types(w.dtype, torch.float32))
                G = X if A is None else torch.addmm(X, A, B)
                blocks.append((2.0 * self.lmbda * G).to(w.dtype))
            if len(parts) == 1 and parts[0][:2] == (0, w.shape[0]):
                G = blocks[0]
            else:
                G = ops.pad_slices(blocks, [p[:2] for p in parts], w.shape[0], dim=0)
            out[weight] = G.t().contiguous() if w is not weight else G
        return out

    def effective_ranks(self) -> list[int]:
        """Number of kept triplets (``sigma_i > eps``) per operator."""
        return [op.k for op in self.ops]

    def stats(self) -> list[dict]:
        """One dict per operator (operator order), for monitoring ranks:

        * ``name``: the module's name in its model when the mapping came from :func:`extract_linear`, else
          ``"op<i>"``;
        * ``weight``: the regularised parameter itself; ``rows``: the ``(start, stop)`` output-feature slice, or
          None for the whole weight; ``shape``: ``(m, n)`` of the operator (``nn.Linear`` orientation);
        * ``target_rank`` (resolved to an int), ``kept`` (triplets with ``sigma_i > eps``), ``eps`` (float);
        * ``sigma``: the kept singular values, a list of floats (descending).

        The host copies are made here, in one read of all operators' sigma, and nowhere else.
        """
        by_device: dict = {}
        for op in self.ops:
            by_device.setdefault(op.S.device, []).append(op)
        sigma = {}
        for members in by_device.values():  # one read per device
            flat = torch.cat([op.S.detach().to(torch.float64) for op in members]).tolist()
            pos = 0
            for op in members:
                sigma[id(op)], pos = flat[pos:pos + op.k], pos + op.k
        return [{"name": op.module_name or f"op{i}", "weight": op.weight, "rows": op.rows, "shape": (op.m, op.n),
                 "target_rank": op.rank, "kept": op.k, "eps": float(op.eps), "sigma": sigma[id(op)]}
                for i, op in enumerate(self.ops)]

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self, param_index: Callable[[torch.Tensor], int] | None = None) -> dict:
        """Counters, eps, triplets and warm-start basis of every operator (tensors cloned); ``param_index`` names
        weights. With FSDP2 (DTensor) weights a collective: their whole ``U`` is gathered (q3r/sharded.py)."""
        whole = _sharded.gathered_U(self.ops)
        return {
            "t": self.t, "t0": self.t0, "n_refresh": self.n_refresh,
            "ops": [{"shape": tuple(op.weight.shape), "rows": op.rows, "rank": op.rank, "eps": op.eps,
                     "eps0": op.eps0, "U": whole.get(id(op), op.U).clone(), "S": op.S.clone(), "Vh": op.Vh.clone(),
                     "basis": None if op.basis is None else op.basis.clone(),
                     "param": None if param_index is None else param_index(op.weight)} for op in self.ops],
        }

    def load_state_dict(self, state: dict, param_index: Callable[[torch.Tensor], int] | None = None) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` (changing nothing) when the operators do not line up."""
        self.check_state_dict(state, param_index)
        for s, op in zip(state["ops"], self.ops, strict=True):
            kw = dict(dtype=op.cdtype, device=op.weight.device)
            op.eps, op.eps0 = float(s["eps"]), s["eps0"]
            op.set_triplets(_sharded.local_rows(op, s["U"]).to(**kw), s["S"].to(**kw), s["Vh"].to(**kw))
            # states saved before the warm start existed have no basis: that operator's next rebuild is cold
            basis = s.get("basis")
            op.basis = None if basis is None else basis.to(**kw)
        self.t, self.t0, self.n_refresh = state["t"], state["t0"], state["n_refresh"]
        self._stacks = self._batches = None

    def check_state_dict(self, state: dict, param_index: Callable[[torch.Tensor], int] | None = None) -> None:
        """Raise ``ValueError`` unless ``state`` (from :meth:`state_dict`) fits these operators."""
        saved = state["ops"]
        if len(saved) != len(self.ops):
            raise ValueError(f"state has {len(saved)} Q3R operators, this Q3R has {len(self.ops)}")
        for i, (s, op) in enumerate(zip(saved, self.ops, strict=True)):
            if tuple(s["shape"]) != tuple(op.weight.shape) or s["rows"] != op.rows or s["rank"] != op.rank:
                raise ValueError(f"Q3R operator {i}: saved (shape {s['shape']}, rows {s['rows']}, rank {s['rank']})"
                                 f" != {op.name} rank {op.rank}")
            if param_index is not None and s.get("param") is not None and s["param"] != param_index(op.weight):
                raise ValueError(f"Q3R operator {i} belongs to parameter {s['param']}, here to "
                                 f"{param_index(op.weight)}")
            basis = s.get("basis")
            if basis is not None and (basis.dim() != 2 or basis.shape[1] != op.n):
                raise ValueError(f"Q3R operator {i}: saved basis of shape {tuple(basis.shape)} does not fit "
                                 f"{op.name} (expected (k, {op.n}))")
