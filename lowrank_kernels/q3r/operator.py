"""The Q3R operator's numerics: its state, the thin factors of ``L X R``, and the SVDs that rebuild it.

Internal to :mod:`lowrank_kernels.q3r` (see its docstring for the maths); split from it to keep the
regulariser's bookkeeping apart from the linear algebra.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch

from .. import ops
from ..ops.truncated_svd import sketch_width, svd_path, truncated_svd_deferred
from .config import check_rank_spec

# Rebuild settings shared by the one-process rebuild (regularizer.py) and the sharded one (sharded.py).
# Triplets computed beyond max(r, last kept count) + 1, so that sigma_{r+1} is not the sketch's last (least
# accurate) place and a lagging eps rarely needs a second, wider SVD.
_WIDEN_MARGIN = 4
# Triplet counts are rounded up to a multiple of this, so that operators whose kept counts differ a little still
# share a batched call (larger multiples cost columns in every product).
_K_ROUND = 4
# Most elements of the seeded sketches kept between rebuilds (16 MB in fp32).
_SKETCH_CACHE_ELEMENTS = 1 << 22
# Up to this min(m, n) an operator's first rebuild (with warm_start) and a refinement of last resort take the exact
# SVD; beyond it the randomized one (the full SVD's cost grows with min(m, n)^2 max(m, n)).
_EXACT_COLD_DIM = 1024
# A kept sigma must exceed eps by more than this many units of roundoff of sigma_1.
_KEEP_ULPS = 16
# Rounds of subspace iterations for the operators whose rebuild failed the check, before the exact SVD.
_REFINE_ROUNDS = 1

EPS_START = 1e8
Rank = int | float


def resolve_rank(spec: Rank, m: int, n: int, where: str = "target_rank") -> int:
    """A float in (0, 1) is a fraction of ``min(m, n)`` (floored, at least 1); an int >= 1 is absolute.

    Raises ``TypeError`` for a spec that is not a number and ``ValueError`` for one out of range, naming
    ``where``."""
    check_rank_spec(spec, where)
    if isinstance(spec, numbers.Integral):
        return int(spec)
    return max(1, int(spec * min(m, n)))


class _Operator:
    """State of one reweighting operator: the kept triplets, eps and the schedule's anchor eps0.

    ``weight`` is the parameter itself; ``transposed`` says it is stored ``(in, out)`` (transformers' ``Conv1D``),
    in which case :meth:`view` reads it through its transpose, so that ``X (m, n)`` is always in ``nn.Linear``'s
    orientation and ``rows`` are output features. ``module_name`` is the module's name in its model where known
    (:func:`extract_linear`), else None; ``name`` describes the operator in messages.
    """

    def __init__(self, weight: torch.Tensor, rows: tuple[int, int] | None, rank: int, name: str,
                 transposed: bool = False, module_name: str | None = None):
        self.weight, self.rows, self.rank, self.name = weight, rows, rank, name
        self.transposed, self.module_name = transposed, module_name
        out_features, self.n = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
        self.m = out_features if rows is None else rows[1] - rows[0]
        self.cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.eps, self.eps0 = EPS_START, None
        # right singular vectors (k_b, n) of the last rebuild, all it computed (kept or not): the next rebuild's
        # warm start; None before the first rebuild and when Q3R's warm_start is off
        self.basis: torch.Tensor | None = None
        self.set_triplets(*self.empty())

    def empty(self):
        kw = dict(dtype=self.cdtype, device=self.weight.device)
        return torch.zeros(self.m, 0, **kw), torch.zeros(0, **kw), torch.zeros(0, self.n, **kw)

    def set_triplets(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, d: torch.Tensor | None = None) -> None:
        """Keep ``U (m, k)``, ``S (k,)``, ``Vh (k, n)`` and their reweights ``d = min(eps / S, 1) - 1``
        (:func:`_reweights` of the current ``eps``, unless a caller that computed a batch of them passes ``d``).

        ``U`` may be a strided view (the first ``k`` columns of a rebuild's ``(m, k')`` block: copying it would
        cost a launch per operator); ``S``, ``Vh`` and ``d`` are made contiguous (row slices: usually free)."""
        self.U, self.S, self.Vh = U, S.contiguous(), Vh.contiguous()
        if d is None:
            d = _reweights(torch.tensor(self.eps, dtype=self.S.dtype).to(self.S.device), self.S)
        self.d = d.contiguous()

    @property
    def k(self) -> int:
        return self.S.numel()

    def view(self, w: torch.Tensor) -> torch.Tensor:
        """The operator's ``(m, n)`` block of ``w`` (this operator's weight or a tensor of its shape), a view."""
        if self.transposed:
            w = w.t()
        return w if self.rows is None else w[self.rows[0]:self.rows[1]]

    def factors(self, X: torch.Tensor):
        """``(A (m, 2k), B (2k, n))`` with ``L X R = X + A B``; ``(None, None)`` when no triplet is kept."""
        return _factors(X, self.U, self.Vh, self.d) if self.k else (None, None)

    def value(self, X: torch.Tensor) -> torch.Tensor:
        v = X.square().sum()
        if self.k:
            d = self.d
            P, Q, C = _thin(X, self.U, self.Vh)
            v = v + (d * P.square().sum(1)).sum() + (d * Q.square().sum(0)).sum() + (d[:, None] * d * C.square()).sum()
        return v


def _thin(X: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor):
    """``P = U^T X (..., k, n)``, ``Q = X V (..., m, k)``, ``C = P V (..., k, k)``; one matrix or a stack."""
    P = U.transpose(-1, -2) @ X
    V = Vh.transpose(-1, -2)
    return P, X @ V, P @ V


def _factors(X: torch.Tensor, U: torch.Tensor, Vh: torch.Tensor, d: torch.Tensor):
    """``A (..., m, 2k) = [U, Q D]``, ``B (..., 2k, n) = [D (P + C D V^T); V^T]``: ``L X R = X + A B``."""
    P, Q, C = _thin(X, U, Vh)
    Pt = d[..., :, None] * (P + (C * d[..., None, :]) @ Vh)
    return torch.cat([U, Q * d[..., None, :]], dim=-1), torch.cat([Pt, Vh], dim=-2)


def _reweights(eps: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """``d = min(eps / S, 1) - 1`` elementwise (``eps`` a tensor broadcastable to ``S``): one formula for every
    place that forms ``d``, so that a rebuilt, a loaded and a shared operator agree to the bit."""
    return (eps / S).clamp(max=1.0) - 1.0


def _ritz_residuals(X: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> torch.Tensor:
    """``||X v_i - s_i u_i||`` per triplet, ``(b, k)``, of the stack ``X (b, m, n)`` and its approximate
    triplets ``U (b, m, k)``, ``S (b, k)``, ``Vh (b, k, n)``: one batched product.

    For a Rayleigh-Ritz result from a left basis ``Q`` (what :func:`ops.truncated_svd` returns) the other
    residual, ``||X^T u_i - s_i v_i||``, is zero up to roundoff (``X^T u_i = B^T w_i = s_i v_i`` with
    ``B = Q^T X``), so this one carries all the information: some singular value of ``X`` lies within
    ``||X v_i - s_i u_i|| / sqrt(2)`` of ``s_i``, and the error of ``s_i`` shrinks like the residual's square
    where the spectrum has a gap.
    """
    return torch.linalg.vector_norm(torch.bmm(X, Vh.transpose(1, 2)) - U * S[:, None, :], dim=1)


def _seeded_sketch(seeds: Sequence[int], n: int, width: int, dtype: torch.dtype, device: torch.device,
                   cache: dict | None = None, cache_elements: int = 0) -> torch.Tensor:
    """``(b, n, width)`` Gaussian blocks, block ``j`` drawn with ``seeds[j]`` (its own generator): a matrix's
    sketch does not depend on what it is stacked with (one process vs DDP). With a ``cache`` dict the stack is
    kept there while the cache holds at most ``cache_elements`` elements, since the same draws serve every
    rebuild and drawing them is a per-operator loop."""
    key = (tuple(seeds), n, width, dtype, device)
    sketch = cache.get(key) if cache is not None else None
    if sketch is None:
        blocks = []
        for seed in seeds:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            blocks.append(torch.randn(n, width, generator=gen, dtype=dtype, device=device))
        sketch = torch.stack(blocks)
        if cache is not None and sum(t.numel() for t in cache.values()) + sketch.numel() <= cache_elements:
            cache[key] = sketch
    return sketch


def _sketched_svd(X: torch.Tensor, k: int, seeds: Sequence[int], oversample: int, n_iter: int,
                  cache: dict | None = None, cache_elements: int = 0,
                  bases: Sequence[torch.Tensor] | None = None, deferred: bool = False):
    """Top-``k`` triplets of each ``X[j] (m, n)`` of a same-shape stack ``X (b, m, n)``.

    ``deferred=True``: :func:`~lowrank_kernels.ops.truncated_svd.truncated_svd_deferred` instead (a fourth
    result, the convergence flag on the device or None, for the caller to read with its own results; where it
    is False the caller repeats the call without ``deferred``).

    One batched :func:`ops.truncated_svd` call (one set of kernels for the whole stack), each matrix from its
    own seeded sketch (:func:`_seeded_sketch`; ``cache``, ``cache_elements`` as there), so that its result does
    not depend on the stack.

    Warm start: ``bases[j] (k_j, n)``, the right singular vectors of ``X[j]``'s previous rebuild, replace the
    first ``k_j`` columns of its sketch; the seeded columns after them are the oversampling. Weights move
    little between rebuilds, so that block is already close to the top right subspace and ``n_iter = 0``
    (one product, the Rayleigh-Ritz projection) is enough: each rebuild is then one more step of a subspace
    iteration that runs across rebuilds.
    """
    _, m, n = X.shape
    sketch = None  # none needed when truncated_svd answers with the full SVD (small or k close to min(m, n))
    if svd_path((m, n), k, oversample) == "randomized":
        sketch = _seeded_sketch(seeds, n, sketch_width((m, n), k, oversample), X.dtype, X.device, cache,
                                cache_elements)
        if bases is not None:
            sketch = sketch.clone()
            widths = [min(basis.shape[0], sketch.shape[-1]) for basis in bases]
            if len(set(widths)) == 1:  # the usual case: one copy for the stack
                c = widths[0]
                sketch[:, :, :c] = torch.stack([basis[:c] for basis in bases]).transpose(1, 2)
            else:
                for j, (basis, c) in enumerate(zip(bases, widths, strict=True)):
                    sketch[j, :, :c] = basis[:c].T
    if deferred:
        return truncated_svd_deferred(X, k, oversample=oversample, n_iter=n_iter, sketch=sketch)
    return ops.truncated_svd(X, k, oversample=oversample, n_iter=n_iter, sketch=sketch)


class _SliceBatch:
    """Operators on same-size, adjacent row slices of one weight (or one whole weight), stacked for ``bmm``.

    Their rows ``[start, stop)`` of a contiguous weight are viewed as ``X (b, m, n)`` without a copy (QKV's three
    slices: one batch), and :meth:`step_` applies ``X <- beta X + alpha (L X R - X)`` per slice in six batched
    products: ``L X R - X = Ud P + (Q + Ud C) Vd`` with ``Ud = U D``, ``Vd = D V^T``, ``P = U^T X``, ``Q = X V``,
    ``C = P V``. The triplets are zero-padded to the largest kept count ``K`` (a padded ``d`` is 0: it adds
    nothing). Built once per rebuild.
    """

    def __init__(self, ops: Sequence[_Operator], start: int, stop: int):
        first = ops[0]
        self.start, self.stop, self.shape = start, stop, (len(ops), first.m, first.n)
        self.K = max(op.k for op in ops)
        if not self.K:
            return
        b, m, n = self.shape
        kw = dict(dtype=first.cdtype, device=first.weight.device)
        if len(ops) == 1:  # views of the operator's own triplets: no copy
            Ut, self.Vh, d = first.U.T[None], first.Vh[None], first.d[None]
        elif all(op.k == self.K for op in ops):
            Ut, self.Vh = torch.stack([op.U.T for op in ops]), torch.stack([op.Vh for op in ops])
            d = torch.stack([op.d for op in ops])
        else:
            Ut, self.Vh, d = (torch.zeros(b, self.K, m, **kw), torch.zeros(b, self.K, n, **kw),
                              torch.zeros(b, self.K, **kw))
            for j, op in enumerate(ops):
                Ut[j, :op.k], self.Vh[j, :op.k], d[j, :op.k] = op.U.T, op.Vh, op.d
        self.Ut = Ut
        self.UdT = Ut * d[..., None]  # (b, K, m): Ud^T, contiguous (a new tensor)
        self.Vd = self.Vh * d[..., None]  # (b, K, n)
        self.V, self.Ud = self.Vh.transpose(1, 2), self.UdT.transpose(1, 2)  # views, made once per rebuild

    def step_(self, w: torch.Tensor, alpha: float, beta: float) -> None:
        """``X <- beta X + alpha (L X R - X)`` per slice of ``w[start:stop]``, in place (``w`` contiguous, of the
        compute dtype)."""
        X = w[self.start:self.stop].view(self.shape)
        if not self.K:
            if beta != 1.0:
                X.mul_(beta)
            return
        P = torch.bmm(self.Ut, X)  # (b, K, n)
        QT = torch.bmm(self.Vh, X.transpose(1, 2))  # (b, K, m) = (X V)^T
        C = torch.bmm(P, self.V)  # (b, K, K)
        QT.baddbmm_(C.transpose(1, 2), self.UdT)  # (Q + Ud C)^T
        X.baddbmm_(self.Ud, P, beta=beta, alpha=alpha)
        X.baddbmm_(QT.transpose(1, 2), self.Vd, alpha=alpha)


def _slice_batches(ops: Sequence[_Operator], rows: int) -> tuple[list[_SliceBatch], list[tuple[int, int]]]:
    """The operators of one weight (``rows`` output rows) in :class:`_SliceBatch` runs, and the uncovered rows."""
    spans = sorted((((op.rows or (0, rows)), op) for op in ops), key=lambda t: t[0])
    batches, run, uncovered, covered = [], [], [], 0
    for (s, e), op in spans:
        if run and (s != run[-1][0][1] or e - s != run[0][0][1] - run[0][0][0]):
            batches.append(_SliceBatch([o for _, o in run], run[0][0][0], run[-1][0][1]))
            run = []
        run.append(((s, e), op))
        if s > covered:
            uncovered.append((covered, s))
        covered = e
    batches.append(_SliceBatch([o for _, o in run], run[0][0][0], run[-1][0][1]))
    if covered < rows:
        uncovered.append((covered, rows))
    return batches, uncovered


# ------------------------------------------------------------------------------------ per-step operator stacks
# Kept counts are padded to a multiple of this in a stack (zero columns, d = 0): a kept count that moves by a few
# between rebuilds keeps the stack's shapes (and a captured CUDA graph's, and a compiled kernel's) unchanged.
_WIDTH_ROUND = 8




class _OpStack:
    """Operators of one shape up to transpose, one weight dtype and device (and one key of the caller's, e.g.
    the optimizer's param group), stacked for a fixed number of batched products per step.

    Every member ``j`` is seen in the stack's orientation ``(m, n)``: an operator of shape ``(n, m)`` (``fc2``
    next to ``fc1``) enters transposed, its ``U`` and ``V`` swapped. The kept triplets are zero-padded to one
    width ``K`` (a multiple of ``_WIDTH_ROUND``, at most ``min(m, n)``): a padded column has ``d = 0`` and
    adds nothing, so the kept count is a mask over a fixed width and no shape depends on data. Built once per
    rebuild (after which only the weights' contents change), in the compute dtype:

    * ``Ut (b, K, m)``, ``Vh (b, K, n)``: the kept singular vectors;
    * ``AT (b, 2K, m) = [D U^T; W^T]`` and ``B (b, 2K, n) = [P; D V^T]``, so that
      ``L X R - X = AT^T B`` per member, with ``P = U^T X``, ``W = X V + U D C``, ``C = P V``; the ``D U^T``
      and ``D V^T`` halves are fixed, :meth:`thin` writes ``P`` and ``W^T`` into the other halves each step
      (persistent buffers: a captured CUDA graph keeps its addresses);
    * :meth:`table`: per member ``[address of X_j, row stride, column stride, address of AT_j, address of B_j]``
      (int64, on the device), for the kernel that updates the weights in place.
    """

    def __init__(self, members: Sequence[tuple[_Operator, bool]]):
        self.ops = [op for op, _ in members]
        self.flip = [flip for _, flip in members]
        first, flip0 = members[0]
        self.m, self.n = (first.n, first.m) if flip0 else (first.m, first.n)
        self.cdtype, self.device, self.dtype = first.cdtype, first.weight.device, first.weight.dtype
        b, m, n = len(self.ops), self.m, self.n
        kmax = max(op.k for op in self.ops)
        self.K = K = min(min(m, n), -(-kmax // _WIDTH_ROUND) * _WIDTH_ROUND) if kmax else 0
        self._addr: list[int] | None = None
        self._table: torch.Tensor | None = None
        self.key = None  # the grouping key of _op_stacks
        self.AT = self.B = self.X = None
        if not K:
            return
        kw = dict(dtype=self.cdtype, device=self.device)
        Ut, Vh, d = self._padded(members, K)
        self.Ut, self.Vh = Ut, Vh
        # the fixed halves are written here, the others by every thin() before they are read
        self.AT, self.B = torch.empty(b, 2 * K, m, **kw), torch.empty(b, 2 * K, n, **kw)
        self.UdT = torch.mul(Ut, d[..., None], out=self.AT[:, :K])
        torch.mul(Vh, d[..., None], out=self.B[:, K:])
        # contiguous scratch for the per-step products: in-place products on the strided halves of AT and B
        # fall back to one small GEMM per member on the CPU (~3 ms per ViT-Tiny step)
        self._P, self._WT = torch.empty(b, K, n, **kw), torch.empty(b, K, m, **kw)

    def _padded(self, members, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Ut (b, K, m)``, ``Vh (b, K, n)``, ``d (b, K)`` of the members, zero-padded to ``K``, in a fixed number
        of launches whatever ``b`` (per array one ragged stack and one padding), not three copies per member."""
        b, m, n = len(members), self.m, self.n
        lefts = [op.Vh.T if flip else op.U for op, flip in members]  # (m, k) in the stack's orientation
        rights = [op.U.T if flip else op.Vh for op, flip in members]  # (k, n)
        with warnings.catch_warnings():  # torch's strided nested tensors warn that they are a prototype
            warnings.simplefilter("ignore", UserWarning)
            left = torch.nested.nested_tensor(lefts).to_padded_tensor(0.0, output_size=(b, m, K))
            right = torch.nested.nested_tensor(rights).to_padded_tensor(0.0, output_size=(b, K, n))
            d = torch.nested.nested_tensor([op.d for op, _ in members]).to_padded_tensor(0.0, output_size=(b, K))
        return left.transpose(1, 2), right, d  # Ut as a transposed view: bmm takes it as it is

    def views(self) -> list[torch.Tensor]:
        """Each member's rows of its current weight, ``(m, n)`` in the stack's orientation (views, no copy)."""
        return [op.view(op.weight).T if flip else op.view(op.weight)
                for op, flip in zip(self.ops, self.flip, strict=True)]

    def table(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """``(b, 5)`` int64 on the device: each member's weight address and (row, column) strides in the stack's
        orientation, then the addresses of its ``AT`` and ``B`` blocks. Remade only when a weight moved
        (``p.data = ...``, ``.to()``), so a step normally makes no host-to-device copy."""
        addr = [v.data_ptr() for v in views]
        if addr != self._addr:
            rows = []
            for j, v in enumerate(views):
                at = 0 if self.AT is None else self.AT[j].data_ptr()
                bt = 0 if self.B is None else self.B[j].data_ptr()
                rows.append([addr[j], v.stride(0), v.stride(1), at, bt])
            self._table = torch.tensor(rows, dtype=torch.int64, device=self.device)
            self._addr = addr
        return self._table

    def stacked(self, views: Sequence[torch.Tensor]) -> torch.Tensor:
        """``X (b, m, n)``: a copy of the members' current weights in the compute dtype, in one launch. The
        buffer is kept for the stack's life (one rebuild period): a fresh one per step cost the CPU a page fault
        per 4 KiB (``stack`` of ViT-Tiny's 48 square slices: ~13 ms fresh vs ~0.3 ms reused), and a captured
        CUDA graph needs fixed addresses anyway."""
        if self.X is None:
            self.X = torch.empty(len(self.ops), self.m, self.n, dtype=self.cdtype, device=self.device)
        return torch.stack(list(views), out=self.X)

    def thin(self, X: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Write ``P = U^T X`` and ``W^T = (X V + Ud C)^T``, ``C = P V``, into ``B`` and ``AT`` (four batched
        products into contiguous scratch, then two small copies): then ``L X R - X = AT^T B`` for every member.
        ``keep`` (a 0-d tensor) multiplies both products in those copies, masking ``AT^T B`` without a pass over
        ``(b, m, n)``."""
        K = self.K
        P = torch.bmm(self.Ut, X, out=self._P)
        WT = torch.bmm(self.Vh, X.transpose(1, 2), out=self._WT)  # (X V)^T
        C = torch.bmm(P, self.Vh.transpose(1, 2))  # (b, K, K)
        WT.baddbmm_(C.transpose(1, 2), self.UdT)  # + (Ud C)^T
        if keep is None:
            self.B[:, :K].copy_(P)
            self.AT[:, K:].copy_(WT)
        else:
            torch.mul(P, keep, out=self.B[:, :K])
            torch.mul(WT, keep, out=self.AT[:, K:])


def _op_stacks(ops: Sequence[_Operator], key=None, max_elements: int = 1 << 25,
               transposed: bool = True) -> list[_OpStack]:
    """The operators grouped into :class:`_OpStack` s by (shape up to transpose, weight dtype, device,
    ``key(op)``), in chunks whose stacked weights hold at most ``max_elements`` elements (the per-step stack is
    a copy). An operator joins a group of its transposed shape when one exists already, unless ``transposed``
    is False (then shapes are grouped as they are)."""
    groups: dict[tuple, list[tuple[_Operator, bool]]] = {}
    for op in ops:
        extra = None if key is None else key(op)
        straight = (op.m, op.n, op.weight.dtype, op.weight.device, extra)
        flipped = (op.n, op.m, op.weight.dtype, op.weight.device, extra)
        if transposed and straight not in groups and flipped in groups:
            groups[flipped].append((op, True))
        else:
            groups.setdefault(straight, []).append((op, False))
    stacks = []
    for (m, n, _, _, extra), members in groups.items():
        per = max(1, max_elements // max(1, m * n))
        for c in range(0, len(members), per):
            stacks.append(_OpStack(members[c:c + per]))
            stacks[-1].key = extra
    return stacks
