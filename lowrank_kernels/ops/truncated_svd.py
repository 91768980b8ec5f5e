"""Top-``rank`` singular triplets by randomized subspace iteration (Halko, Martinsson & Tropp 2011, alg. 4.4).

``truncated_svd(W, rank)`` never runs a full SVD of ``W`` when ``rank`` is small against ``min(m, n)``:
it multiplies ``W`` by a thin random block, alternates ``n_iter`` times between ``W^T Q`` and ``W Q``
(orthonormalising after every product so the basis never loses the trailing directions), then takes the
exact SVD of the small ``(rank + oversample) x n`` projection ``Q^T W``.

Orthonormalisation on CUDA is Cholesky-QR (``Q = Y R^{-1}`` with ``R^T R = Y^T Y``, Gram in fp64, done
twice: "CholeskyQR2"), because batched ``torch.linalg.qr`` runs a loop of small kernels on the GPU while
Cholesky-QR is two matmuls and a tiny batched factorisation. When the Gram matrix is not positive definite
or too ill-conditioned (rank-deficient ``W``, exact zeros) it falls back to Householder ``torch.linalg.qr``.
On the CPU LAPACK's Householder QR is the faster one (3072x72 fp32, 2 cores: 2.7 ms vs 29.5 ms for
CholeskyQR2 with its fp64 Gram), so it is used directly there (see :data:`ORTHO_METHOD`).
"""

from __future__ import annotations

import warnings

import torch

from .._checks import check_finite, check_positive_int, check_tensor

# Up to this many rows/columns, or when rank + oversample covers this fraction of min(m, n), the
# randomized method saves nothing: LAPACK's SVD of the whole matrix is as fast and exact. Measured (best
# of 7, 2 shared CPU cores, fp32, full SVD vs randomized): 128^2 rank 8: 2.0 vs 1.7 ms; 256^2 rank 32:
# 40.6 vs 37.1 ms; 384^2 rank 32: 154 vs 26 ms.
SMALL_DIM = 192
DENSE_FRACTION = 0.5
# R's diagonal ratio below which Cholesky-QR of an fp64 Gram is no longer trusted (cond(Y) > ~1e6).
_CHOLQR_MIN_DIAG_RATIO = 1e-6
# The orthonormality error ||Q^T Q - I||_max above which the result is treated as not converged.
_ORTHO_TOL = {torch.float32: 1e-3, torch.float64: 1e-9}

# Orthonormalisation per device type; devices not listed use "householder".
ORTHO_METHOD = {"cuda": "cholesky"}

_SVD_PATH_FULL = "full"
_SVD_PATH_RANDOMIZED = "randomized"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cholesky_qr_once(Y: torch.Tensor) -> torch.Tensor | None:
    """One Cholesky-QR pass; ``None`` when the Gram matrix is not safely positive definite."""
    G = Y.transpose(-1, -2).to(torch.float64) @ Y.to(torch.float64)
    L, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()):
        return None
    diag = L.diagonal(dim1=-2, dim2=-1)
    ratio = diag.min(dim=-1).values / diag.max(dim=-1).values.clamp_min(torch.finfo(torch.float64).tiny)
    if not bool((ratio > _CHOLQR_MIN_DIAG_RATIO).all()):
        return None
    # Q = Y L^{-T}: solve L Q^T = Y^T, i.e. Q L^T = Y from the right.
    Linv_t = torch.linalg.solve_triangular(L.transpose(-1, -2), torch.eye(L.shape[-1], dtype=L.dtype,
                                                                          device=L.device), upper=True)
    return Y @ Linv_t.to(Y.dtype)


def orthonormalize(Y: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """Orthonormal basis ``Q (..., m, k)`` of the columns of ``Y (..., m, k)``, ``k <= m``.

    ``method``: ``"cholesky"`` (CholeskyQR2, two passes with an fp64 Gram; Householder when Cholesky fails
    or the columns are nearly dependent) or ``"householder"`` (``torch.linalg.qr``); ``None`` picks by
    device from :data:`ORTHO_METHOD`.
    """
    method = method or ORTHO_METHOD.get(Y.device.type, "householder")
    if method not in ("cholesky", "householder"):
        raise ValueError(f"method must be 'cholesky' or 'householder', got {method!r}")
    Q = _cholesky_qr_once(Y) if method == "cholesky" else None
    if Q is not None:
        Q = _cholesky_qr_once(Q)
    if Q is None:
        Q = torch.linalg.qr(Y, mode="reduced").Q
    return Q


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


def _randomized(A: torch.Tensor, rank: int, oversample: int, n_iter: int,
                generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    m, n = A.shape[-2:]
    k = min(rank + oversample, min(m, n))
    At = A.transpose(-1, -2)
    omega = torch.randn(*A.shape[:-2], n, k, dtype=A.dtype, device=A.device, generator=generator)
    Q = orthonormalize(A @ omega)
    for _ in range(n_iter):
        Q = orthonormalize(A @ orthonormalize(At @ Q))
    B = Q.transpose(-1, -2) @ A  # (..., k, n): small, exact SVD is cheap
    # SVD of the tall column-major view B^T, not of B: LAPACK then needs no copy and takes its tall path
    # (80x3072 on 2 CPU cores: 2.7 ms vs 20.9 ms best of 7).
    Ut, S, Vth = torch.linalg.svd(B.transpose(-1, -2), full_matrices=False)
    U = Q @ Vth.transpose(-1, -2)[..., :rank]
    return U, S[..., :rank], Ut.transpose(-1, -2)[..., :rank, :]


def _converged(U: torch.Tensor, S: torch.Tensor) -> bool:
    """Finite and orthonormal. Vh = (diag(S)^-1 U^T W) is finite whenever S and U are; a NaN anywhere in
    U makes the orthonormality error NaN, which fails the comparison."""
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    err = (U.transpose(-1, -2) @ U - eye).abs().amax()
    return bool(torch.isfinite(S).all() & (err <= _ORTHO_TOL[U.dtype]))


def truncated_svd(W: torch.Tensor, rank: int, oversample: int = 16, n_iter: int = 4,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    Returns:
        ``U (..., m, rank)``, ``S (..., rank)`` (descending), ``Vh (..., rank, n)``, computed in fp32 (fp64
        for fp64 input) and returned in that precision. ``W ~= U diag(S) Vh``.

    When ``min(m, n) <= SMALL_DIM`` (192) or ``rank + oversample >= min(m, n) / 2`` the full
    ``torch.linalg.svd`` is used directly (exact and no slower there). If the randomized result is not
    finite or has lost orthonormality, and ``W`` is finite, it warns and falls back to ``torch.linalg.svd``.

    Raises:
        ValueError: bad shape or rank, or ``W`` contains NaN/Inf.
        TypeError: ``W`` is not a floating-point tensor.
    """
    m, n = _check_args(W, rank, oversample, n_iter)
    A = W.to(_compute_dtype(W.dtype))
    if _use_full_svd(m, n, rank, oversample):
        check_finite(W, "W")
        return truncated_svd_ref(A, rank)
    if generator is None:
        generator = torch.Generator(device=A.device)
        generator.manual_seed(0)
    try:
        U, S, Vh = _randomized(A, rank, oversample, n_iter, generator)
        ok = _converged(U, S)
    except torch.linalg.LinAlgError:
        ok = False
    if not ok:
        # NaN/Inf in W always reaches the result (W is multiplied by a dense Gaussian block), so a finite W
        # pays no extra pass for this check (~8% of the run time at 768x3072 rank 64 on the CPU).
        check_finite(W, "W")
        warnings.warn(f"truncated_svd: randomized subspace iteration did not converge for W of shape "
                      f"{tuple(W.shape)} at rank {rank}; falling back to torch.linalg.svd", RuntimeWarning,
                      stacklevel=2)
        return truncated_svd_ref(A, rank)
    return U, S, Vh


def svd_path(shape: tuple[int, ...], rank: int, oversample: int = 16) -> str:
    """Which method :func:`truncated_svd` uses for ``shape`` and ``rank``: ``"full"`` or ``"randomized"``."""
    m, n = shape[-2:]
    return _SVD_PATH_FULL if _use_full_svd(m, n, rank, oversample) else _SVD_PATH_RANDOMIZED
