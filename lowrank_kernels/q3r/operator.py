"""The Q3R operator's numerics: its state, the thin factors of ``L X R``, and the SVDs that rebuild it.

Internal to :mod:`lowrank_kernels.q3r` (see its docstring for the maths); split from it to keep the
regulariser's bookkeeping apart from the linear algebra.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import ops
from ..ops.truncated_svd import sketch_width, svd_path

EPS_START = 1e8
Rank = int | float


def resolve_rank(spec: Rank, m: int, n: int, where: str = "target_rank") -> int:
    """A float in (0, 1) is a fraction of ``min(m, n)`` (floored, at least 1); an int >= 1 is absolute."""
    if isinstance(spec, bool) or not isinstance(spec, (int, float)):
        raise TypeError(f"{where} must be an int or a float, got {type(spec).__name__} {spec!r}")
    if isinstance(spec, float):
        if not 0.0 < spec < 1.0:
            raise ValueError(f"{where} = {spec}: a float target rank must lie in (0, 1) (a fraction of "
                             f"min(m, n)); pass an int for an absolute rank")
        return max(1, int(spec * min(m, n)))
    if spec < 1:
        raise ValueError(f"{where} = {spec}: an int target rank must be >= 1")
    return spec


class _Operator:
    """State of one reweighting operator: the kept triplets, eps and the schedule's anchor eps0."""

    def __init__(self, weight: torch.Tensor, rows: tuple[int, int] | None, rank: int, name: str):
        self.weight, self.rows, self.rank, self.name = weight, rows, rank, name
        self.m = weight.shape[0] if rows is None else rows[1] - rows[0]
        self.n = weight.shape[1]
        self.cdtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self.eps, self.eps0 = EPS_START, None
        # right singular vectors (k_b, n) of the last rebuild, all it computed (kept or not): the next rebuild's
        # warm start; None before the first rebuild and when Q3R's warm_start is off
        self.basis: torch.Tensor | None = None
        self.set_triplets(*self.empty())

    def empty(self):
        kw = dict(dtype=self.cdtype, device=self.weight.device)
        return torch.zeros(self.m, 0, **kw), torch.zeros(0, **kw), torch.zeros(0, self.n, **kw)

    def set_triplets(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> None:
        self.U, self.S, self.Vh = U.contiguous(), S.contiguous(), Vh.contiguous()
        self.d = (self.eps / S).clamp(max=1.0) - 1.0 if S.numel() else S.clone()

    @property
    def k(self) -> int:
        return self.S.numel()

    def view(self, w: torch.Tensor) -> torch.Tensor:
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


def _seeded_sketch(seeds: Sequence[int], n: int, width: int, dtype: torch.dtype, device: torch.device,
                   cache: dict | None = None, cache_elements: int = 0) -> torch.Tensor:
    """``(b, n, width)`` Gaussian blocks, block ``j`` drawn with ``seeds[j]`` (its own generator): a matrix's
    sketch does not depend on what it is stacked with (one process vs DDP). With a ``cache`` dict the stack is
    kept there while the cache holds at most ``cache_elements`` elements (72 seeded draws cost ~4 ms per
    ViT-Tiny rebuild on 2 CPU cores)."""
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
                  bases: Sequence[torch.Tensor] | None = None):
    """Top-``k`` triplets of each ``X[j] (m, n)`` of a same-shape stack ``X (b, m, n)``.

    One batched :func:`ops.truncated_svd` call (one set of kernels for the whole stack on a GPU; 2 CPU
    cores, ViT-Tiny's 72 operators: ~105 vs ~150 ms looped), each matrix from its own seeded sketch
    (:func:`_seeded_sketch`; ``cache``, ``cache_elements`` as there).

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
