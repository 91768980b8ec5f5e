"""Top-``rank`` singular triplets by randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4).

``truncated_svd(W, rank)`` never runs a full SVD of ``W`` when ``rank`` is small against ``min(m, n)``:
it multiplies ``W`` by a thin random block, alternates ``n_iter`` times between ``W^T Q`` and ``W Q``
(orthonormalising after every product so the basis never loses the trailing directions), then takes the
exact SVD of the small ``(rank + oversample) x n`` projection ``Q^T W``.

Orthonormalisation on CUDA is Cholesky-QR (``Q = Y R^{-1}`` with ``R^T R = Y^T Y``, Gram in fp64, done
twice: "CholeskyQR2"), because batched ``torch.linalg.qr`` runs a loop of small kernels on the GPU while
Cholesky-QR is two matmuls and a tiny batched factorisation. It runs without host syncs; when the Gram
matrix was not positive definite or too ill-conditioned (rank-deficient ``W``, exact zeros) the final check
(finite, orthonormal ``U``) fails and the run is repeated with Householder ``torch.linalg.qr``.
On the CPU LAPACK's Householder QR is faster than CholeskyQR2 with its fp64 Gram, but the inner steps of the
iteration only need a well-conditioned basis of the right span, not an orthonormal one: the CPU's ``"hybrid"``
method takes one Cholesky-QR pass with a Gram in the input's precision there (about half the cost of
Householder; Householder when that Gram is not positive definite), and two such passes for the last basis, the
one ``W`` is projected on (the final orthonormality check sends a poor one to the Householder run)
(see :data:`ORTHO_METHOD`). The final ``k x k`` SVD on the CPU comes
from ``eigh`` of the Gram of the projection, fp32 when the kept spectrum allows it, else fp64
(:func:`_small_svd_gram`).
"""

from __future__ import annotations

import warnings

import torch

from .._checks import check_finite, check_positive_int, check_tensor

# Up to this many rows/columns, or when rank + oversample covers this fraction of min(m, n), the
# randomized method saves nothing: LAPACK's SVD of the whole matrix is as fast there, and exact (the
# crossover of the CPU benchmark bench/bench_truncated_svd.py with the defaults oversample=16, n_iter=4).
SMALL_DIM = 128
DENSE_FRACTION = 0.5
# Smallest pivot of the one-pass Cholesky-QR relative to the largest (about 1 / cond(Y)) that its Gram,
# formed in Y's precision, still resolves; below it the inner steps use Householder.
_CHOL_MIN_PIVOT = {torch.float32: 1e-3, torch.float64: 1e-7}
# The orthonormality error ||Q^T Q - I||_max above which the result is treated as not converged.
_ORTHO_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}
# Smallest kept sigma, relative to sigma_1, for which the final step's Gram is formed in fp32 (fp32 input):
# eigenvalue errors ~eps32 sigma_1^2 leave sigma_i relatively accurate to ~eps32 / (2 (sigma_i / sigma_1)^2) <= 4e-5.
_GRAM32_MIN_RATIO = 3e-2

# Orthonormalisation per device type; devices not listed use "householder".
ORTHO_METHOD = {"cuda": "cholesky", "cpu": "hybrid"}

_SVD_PATH_FULL = "full"
_SVD_PATH_RANDOMIZED = "randomized"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cholesky_qr2(Y: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2 (two passes, fp64 Gram) with no host synchronisation.

    A failed or ill-conditioned factorisation (rank-deficient ``Y``, cond(Y) > ~1e7) is not detected here:
    it leaves NaN/Inf or a non-orthonormal ``Q``, which the caller checks once at the end, because a sync
    per orthonormalisation would stall the GPU ~2 n_iter + 2 times per call.
    """
    eye = torch.eye(Y.shape[-1], dtype=torch.float64, device=Y.device)
    for _ in range(2):
        Y64 = Y.to(torch.float64)
        L, _ = torch.linalg.cholesky_ex(Y64.transpose(-1, -2) @ Y64)
        # Q = Y L^{-T}: one small fp64 inverse, then a GEMM in Y's precision.
        Y = Y @ torch.linalg.solve_triangular(L.transpose(-1, -2), eye, upper=True).to(Y.dtype)
    return Y


def _householder(Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(Y, mode="reduced").Q


def _cholesky_qr1(Y: torch.Tensor) -> torch.Tensor:
    """A well-conditioned basis of ``span(Y)`` for the inner steps of the subspace iteration (CPU).

    One Cholesky-QR pass with the Gram in ``Y``'s precision: ``Q = Y L^{-T}`` (``L L^T = Y^T Y``, the small
    inverse formed explicitly, then one GEMM) spans the same space as ``Y`` but is orthonormal only to
    ``~eps cond(Y)^2``, which the next product with ``W`` does not mind. When the factorisation fails or a
    pivot of ``L`` is below :data:`_CHOL_MIN_PIVOT` of the largest (``cond(Y)`` beyond what the Gram holds:
    dependent columns) it falls back to Householder, which costs about twice as much on the CPU.
    """
    L, info = torch.linalg.cholesky_ex(Y.transpose(-1, -2) @ Y)
    pivots = L.diagonal(dim1=-2, dim2=-1)
    ok = (info == 0) & (pivots.amin(-1) > _CHOL_MIN_PIVOT[Y.dtype] * pivots.amax(-1))  # NaN fails too
    if not bool(ok.all()):
        return _householder(Y)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    return Y @ torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)


def _cholesky_qr1x2(Y: torch.Tensor) -> torch.Tensor:
    """CholeskyQR2 with Grams in ``Y``'s precision: orthonormal to ~eps while ``cond(Y) < ~1/sqrt(eps)``;
    beyond that :func:`_cholesky_qr1` hands over to Householder. The CPU's last basis in ``"hybrid"``."""
    return _cholesky_qr1(_cholesky_qr1(Y))


def _is_orthonormal(Q: torch.Tensor) -> bool:
    """All finite and ``max |Q^T Q - I| <= tol`` (NaN fails the comparison); one host sync."""
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    return bool((Q.transpose(-1, -2) @ Q - eye).abs().amax() <= _ORTHO_TOL[Q.dtype])


def _method(method: str | None, device: torch.device) -> str:
    method = method or ORTHO_METHOD.get(device.type, "householder")
    if method not in ("cholesky", "householder", "hybrid"):
        raise ValueError(f"method must be 'cholesky', 'householder' or 'hybrid', got {method!r}")
    return method


def orthonormalize(Y: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """Orthonormal basis ``Q (..., m, k)`` of the columns of ``Y (..., m, k)``, ``k <= m``.

    ``method``: ``"cholesky"`` (CholeskyQR2 with an fp64 Gram, then Householder if the result is not
    orthonormal: dependent or nearly dependent columns) or ``"householder"`` (``torch.linalg.qr``; also what
    ``"hybrid"`` gives here, whose one-pass Cholesky serves only the inner steps of :func:`truncated_svd`);
    ``None`` picks by device from :data:`ORTHO_METHOD`.
    """
    if _method(method, Y.device) == "cholesky":
        Q = _cholesky_qr2(Y)
        if _is_orthonormal(Q):
            return Q
    return _householder(Y)


def _check_args(W, rank, oversample, n_iter) -> tuple[int, int]:
    check_tensor(W, "W")
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be 2-D (m, n) or batched 3-D (b, m, n), got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if m == 0 or n == 0 or (W.dim() == 3 and W.shape[0] == 0):
        raise ValueError(f"W must not be empty, got shape {tuple(W.shape)}")
    check_positive_int(rank, "rank")
    if rank > min(m, n):
        raise ValueError(f"rank={rank} exceeds min(m, n)={min(m, n)} for W of shape {tuple(W.shape)}")
    check_positive_int(oversample, "oversample", minimum=0)
    check_positive_int(n_iter, "n_iter", minimum=0)
    return m, n


def _use_full_svd(m: int, n: int, rank: int, oversample: int) -> bool:
    k = rank + oversample
    return min(m, n) <= SMALL_DIM or k >= DENSE_FRACTION * min(m, n)


def truncated_svd_ref(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle: full ``torch.linalg.svd`` (fp32 or fp64) truncated to ``rank``."""
    A = W.to(_compute_dtype(W.dtype))
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _randomized(A: torch.Tensor, rank: int, n_iter: int, omega: torch.Tensor,
                method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    orth = {"cholesky": _cholesky_qr2, "hybrid": _cholesky_qr1x2}.get(method, _householder)
    inner = _cholesky_qr1 if method == "hybrid" else orth
    At = A.transpose(-1, -2)
    Q = (orth if n_iter == 0 else inner)(A @ omega)
    for i in range(n_iter):
        Q = (orth if i == n_iter - 1 else inner)(A @ inner(At @ Q))
    return project_svd(Q, A, rank)


def project_svd(Q: torch.Tensor, A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` triplets of ``A (..., m, n)`` within the span of the orthonormal ``Q (..., m, k)``.

    The exact SVD of the small projection ``B = Q^T A (..., k, n)`` (Rayleigh-Ritz): on the CPU from the
    Gram's ``eigh`` (:func:`_small_svd_gram`, fp32 or fp64) when it is accurate enough, else LAPACK's SVD of
    ``B^T``.
    """
    B = Q.transpose(-1, -2) @ A
    if A.device.type == "cpu":
        small = _small_svd_gram(B, rank)
        if small is not None:
            W, S, Vh = small
            return Q @ W, S, Vh
    # SVD of the tall column-major view B^T, not of B: LAPACK then needs no copy and takes its (much faster)
    # tall path.
    Ut, S, Vth = torch.linalg.svd(B.transpose(-1, -2), full_matrices=False)
    U = Q @ Vth.transpose(-1, -2)[..., :rank]
    return U, S[..., :rank], Ut.transpose(-1, -2)[..., :rank, :]


def _small_svd_gram(B: torch.Tensor, rank: int):
    """Top-``rank`` SVD of the short-wide ``B (..., k, n)`` from the eigenvectors of its Gram ``B B^T``.

    Returns ``(W (..., k, rank), S, Vh (..., rank, n))`` with ``B ~= W diag(S) Vh`` in ``B``'s dtype, or
    ``None`` when a kept singular value is below ``1e-4 sigma_1`` (squaring would cost it its accuracy: the
    caller then runs the SVD). On the CPU a k x k ``eigh`` is several times cheaper than LAPACK's SVD of ``B``.
    Squaring doubles the condition number, so the Gram is formed in fp32 (about half the cost of fp64) only
    while every kept sigma is above :data:`_GRAM32_MIN_RATIO` ``sigma_1`` (errors below ~1e-4 relative there),
    otherwise in fp64, where the squared condition number (<= 1e8 above the cut-off) leaves the triplets
    accurate to ~1e-8.
    """
    if B.dtype == torch.float32:
        out = _gram_eigh(B, rank, _GRAM32_MIN_RATIO)
        if out is not None:
            return out
    out = _gram_eigh(B.to(torch.float64), rank, 1e-4)
    return None if out is None else tuple(t.to(B.dtype) for t in out)


def _gram_eigh(B: torch.Tensor, rank: int, min_ratio: float):
    ev, W = torch.linalg.eigh(B @ B.transpose(-1, -2))
    ev, W = ev.flip(-1)[..., :rank], W.flip(-1)[..., :rank]  # eigh sorts ascending
    S = ev.clamp_min(0).sqrt()
    if not bool((S[..., -1] > min_ratio * S[..., 0]).all()):
        return None
    return W, S, (W.transpose(-1, -2) @ B) / S[..., None]


def _converged_flag(U: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Finite and orthonormal, as a 0-d bool tensor on ``U``'s device (no host sync). ``Vh`` is finite whenever
    ``S`` and ``U`` are; a NaN in ``U`` makes the orthonormality error NaN, which fails the comparison."""
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    err = (U.transpose(-1, -2) @ U - eye).abs().amax()
    return torch.isfinite(S).all() & (err <= _ORTHO_TOL[U.dtype])


def _converged(U: torch.Tensor, S: torch.Tensor) -> bool:
    """:func:`_converged_flag` on the host (one host sync)."""
    return bool(_converged_flag(U, S))


@torch.no_grad()
def truncated_svd(W: torch.Tensor, rank: int, oversample: int = 16, n_iter: int = 4,
                  generator: torch.Generator | None = None,
                  sketch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets of ``W (m, n)`` or a batch ``W (b, m, n)`` of same-shape matrices.

    Args:
        W: ``(m, n)`` or ``(b, m, n)``, fp16/bf16/fp32/fp64; must be finite.
        rank: number of singular triplets, ``1 <= rank <= min(m, n)``.
        oversample: extra random directions beyond ``rank`` (accuracy of the trailing triplets).
        n_iter: subspace (power) iterations; each costs two products with ``W``. With the defaults the
            top 64 singular values of a 768x3072 matrix with ``sigma_i = exp(-i/32)`` come out to 3.4e-5
            relative (oversample 8: 4.5e-4); a flat bulk (a Gaussian matrix) converges slowly (~5e-2).
        generator: source of the random test matrix. ``None`` uses a fresh generator seeded with 0 on
            ``W``'s device, so results are deterministic and the global RNG stream is left untouched.
        sketch: the starting block itself, ``(..., n, sketch_width(W.shape, rank, oversample))`` on
            ``W``'s device, instead of drawing one from ``generator``: e.g. one seeded block per matrix of a
            batch, so that each matrix's result does not depend on what it is batched with, or a warm start
            whose first columns are previous right singular vectors (then ``n_iter=0`` may suffice, as in
            ``Q3R``'s rebuilds). Unused when the full SVD answers.

    Returns:
        ``U (..., m, rank)``, ``S (..., rank)`` (descending), ``Vh (..., rank, n)``, computed in fp32 (fp64
        for fp64 input) and returned in that precision. ``W ~= U diag(S) Vh``.

    When ``min(m, n) <= SMALL_DIM`` (128) or ``rank + oversample >= min(m, n) / 2`` the full
    ``torch.linalg.svd`` is used directly (exact and no slower there). If the randomized result is not
    finite or has lost orthonormality, and ``W`` is finite, it warns and falls back to ``torch.linalg.svd``.

    Not differentiable (runs under ``torch.no_grad``): it serves rank resizing and initialisation, where a
    graph through QR and SVD would only cost memory.

    Raises:
        ValueError: bad shape or rank, or ``W`` contains NaN/Inf.
        TypeError: ``W`` is not a floating-point tensor.
    """
    m, n = _check_args(W, rank, oversample, n_iter)
    A = W.to(_compute_dtype(W.dtype))
    if _use_full_svd(m, n, rank, oversample):
        check_finite(W, "W")
        return truncated_svd_ref(A, rank)
    sketch = _start_block(W, A, rank, oversample, generator, sketch)
    # Cholesky-QR failures (rank-deficient or very ill-conditioned bases) show up only in the final check;
    # the run is then repeated with Householder QR, and only if that fails too does the full SVD run.
    for method in dict.fromkeys((_method(None, A.device), "householder")):
        try:
            U, S, Vh = _randomized(A, rank, n_iter, sketch, method)
            if _converged(U, S):
                return U, S, Vh
        except torch.linalg.LinAlgError:
            pass
    # NaN/Inf in W always reaches the result (W is multiplied by a dense Gaussian block), so a finite W
    # pays no extra pass over W for this check.
    check_finite(W, "W")
    warnings.warn(f"truncated_svd: randomized subspace iteration did not converge for W of shape "
                  f"{tuple(W.shape)} at rank {rank}; falling back to torch.linalg.svd", RuntimeWarning, stacklevel=2)
    return truncated_svd_ref(A, rank)


@torch.no_grad()
def truncated_svd_deferred(W: torch.Tensor, rank: int, oversample: int = 16, n_iter: int = 4,
                           generator: torch.Generator | None = None, sketch: torch.Tensor | None = None):
    """:func:`truncated_svd` without its final host check: ``(U, S, Vh, ok)``.

    ``ok`` is a 0-d bool tensor on ``W``'s device (the whole batch finite and orthonormal), or None when the
    full SVD answered (exact: nothing to check). The triplets are those of :func:`truncated_svd`'s first
    attempt, so where ``ok`` holds they equal its result; where it does not, the caller calls
    :func:`truncated_svd` with the same arguments (which repeats that attempt when the start is a ``sketch``,
    not a ``generator``'s draw, then falls back to Householder QR and the full SVD). A caller that reads other
    results anyway (``Q3R``'s one read of all sigma) thus saves this function's host sync; the
    orthonormalisation's own syncs (the CPU's ``"hybrid"`` method) and the small SVD's (``eigh``/``svd`` check
    their ``info`` on the host) remain. Arguments and errors as :func:`truncated_svd`; a failed factorisation
    (``LinAlgError``) falls back to it at once.
    """
    m, n = _check_args(W, rank, oversample, n_iter)
    A = W.to(_compute_dtype(W.dtype))
    if _use_full_svd(m, n, rank, oversample):
        check_finite(W, "W")
        return (*truncated_svd_ref(A, rank), None)
    start = _start_block(W, A, rank, oversample, generator, sketch)
    try:
        U, S, Vh = _randomized(A, rank, n_iter, start, _method(None, A.device))
    except torch.linalg.LinAlgError:
        return (*truncated_svd(W, rank, oversample, n_iter, generator, sketch), None)
    return U, S, Vh, _converged_flag(U, S)


def _start_block(W: torch.Tensor, A: torch.Tensor, rank: int, oversample: int, generator: torch.Generator | None,
                 sketch: torch.Tensor | None) -> torch.Tensor:
    """The randomized method's starting block ``(..., n, k)`` in ``A``'s dtype: ``sketch`` checked, or a draw from
    ``generator`` (a fresh one seeded with 0 when None; a generator's state is advanced by each call)."""
    n = A.shape[-1]
    k = sketch_width(W.shape, rank, oversample)
    if sketch is None:
        if generator is None:
            generator = torch.Generator(device=A.device)
            generator.manual_seed(0)
        sketch = torch.randn(*A.shape[:-2], n, k, dtype=A.dtype, device=A.device, generator=generator)
    else:
        check_tensor(sketch, "sketch")
        if sketch.shape != (*A.shape[:-2], n, k):
            raise ValueError(f"sketch has shape {tuple(sketch.shape)}, expected {(*A.shape[:-2], n, k)} for W of "
                             f"shape {tuple(W.shape)}, rank {rank} and oversample {oversample}")
        if sketch.device != A.device:
            raise ValueError(f"sketch is on {sketch.device} but W is on {A.device}")
        sketch = sketch.to(A.dtype)
    return sketch


def sketch_width(shape: tuple[int, ...], rank: int, oversample: int = 16) -> int:
    """Columns of the random test matrix :func:`truncated_svd` starts from: ``min(rank + oversample, m, n)``."""
    m, n = shape[-2:]
    return min(rank + oversample, m, n)


def svd_path(shape: tuple[int, ...], rank: int, oversample: int = 16) -> str:
    """Which method :func:`truncated_svd` uses for ``shape`` and ``rank``: ``"full"`` or ``"randomized"``."""
    m, n = shape[-2:]
    return _SVD_PATH_FULL if _use_full_svd(m, n, rank, oversample) else _SVD_PATH_RANDOMIZED
