"""truncated_svd: randomized subspace iteration against torch.linalg.svd on matrices with known spectra."""

import importlib
import warnings

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops.truncated_svd import orthonormalize, svd_path
from lowrank_kernels.testing import assert_verbose_allclose

# ops.truncated_svd is the function (re-exported), so reach the module through importlib.
tsvd_mod = importlib.import_module("lowrank_kernels.ops.truncated_svd")


def _with_spectrum(shape: tuple[int, ...], s: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``W (..., m, n)`` with singular values ``s`` (len <= min(m, n)); fp32, built in fp64."""
    *batch, m, n = shape
    g = torch.Generator().manual_seed(seed)
    k = s.numel()
    U = torch.linalg.qr(torch.randn(*batch, m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64)).Q
    return ((U * s.double()) @ V.transpose(-1, -2)).float()


@pytest.fixture(autouse=True)
def _small_threshold(monkeypatch):
    """Take the randomized path from min(m, n) > 64 so the tests stay small on a 2-core CI machine."""
    monkeypatch.setattr(tsvd_mod, "SMALL_DIM", 64)


@pytest.fixture(params=["cholesky", "householder", "hybrid"])
def ortho(request, monkeypatch):
    """Run a test with each orthonormalisation (the CPU default is hybrid, CUDA's is Cholesky-QR)."""
    monkeypatch.setattr(tsvd_mod, "ORTHO_METHOD", {"cpu": request.param, "cuda": request.param})
    return request.param


def _check_orthonormal(Q: torch.Tensor, tol: float = 1e-4) -> None:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype).expand(*Q.shape[:-2], -1, -1)
    assert_verbose_allclose(Q.transpose(-1, -2) @ Q, eye, atol=tol, rtol=0, name="Q^T Q")


def _check_subspace(U: torch.Tensor, U_true: torch.Tensor, tol: float) -> None:
    """Projectors agree: ||U U^T - U* U*^T||_2 = sin of the largest principal angle."""
    P = U.double() @ U.double().transpose(-1, -2)
    P_true = U_true.double() @ U_true.double().transpose(-1, -2)
    assert torch.linalg.matrix_norm(P - P_true, 2).max() <= tol


@pytest.mark.parametrize("shape, rank", [((100, 170), 12), ((180, 97), 20), ((2, 90, 110), 7)])
def test_decaying_spectrum(shape, rank, ortho):
    k = min(shape[-2:])
    s = 5.0 * 0.8 ** torch.arange(float(k))
    W = _with_spectrum(shape, s)
    assert svd_path(W.shape, rank) == "randomized"
    U, S, Vh = ops.truncated_svd(W, rank)
    assert U.shape == (*shape[:-1], rank) and S.shape == (*shape[:-2], rank) and Vh.shape == (*shape[:-2], rank,
                                                                                               shape[-1])
    assert_verbose_allclose(S, s[:rank].expand_as(S), rtol=1e-3, atol=0, name="S")
    _check_orthonormal(U)
    _check_orthonormal(Vh.transpose(-1, -2))
    U_ref, _, Vh_ref = ops.truncated_svd_ref(W, rank)
    _check_subspace(U, U_ref, 1e-3)
    _check_subspace(Vh.transpose(-1, -2), Vh_ref.transpose(-1, -2), 1e-3)
    # Near-optimal reconstruction (Eckart-Young bound is the tail of the spectrum).
    err = torch.linalg.matrix_norm(W.double() - (U * S.unsqueeze(-2)).double() @ Vh.double())
    assert (err <= 1.001 * s[rank:].double().square().sum().sqrt() + 1e-5).all()


def test_flat_spectrum_values():
    W = _with_spectrum((100, 130), torch.full((100,), 3.0))
    _, S, _ = ops.truncated_svd(W, 10)
    assert_verbose_allclose(S, torch.full((10,), 3.0), rtol=1e-3, atol=0, name="S")


@pytest.mark.parametrize("zero", [False, True])
def test_rank_deficient_and_zero(zero, ortho, monkeypatch):
    """Y = W Omega has dependent columns: Cholesky-QR must hand over to Householder QR."""
    s = torch.zeros(0) if zero else torch.tensor([6.0, 2.0, 1.0, 0.5])
    W = torch.zeros(120, 100) if zero else _with_spectrum((120, 100), s)
    methods = []
    randomized = tsvd_mod._randomized
    monkeypatch.setattr(tsvd_mod, "_randomized", lambda *a: methods.append(a[-1]) or randomized(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall back to the full SVD
        U, S, Vh = ops.truncated_svd(W, 10)
    if ortho == "cholesky" and zero:
        assert methods == ["cholesky", "householder"], "a zero Gram matrix must send the run to Householder QR"
    assert methods[-1] == ortho or methods == ["cholesky", "householder"]
    expected = torch.cat([s, torch.zeros(10 - s.numel())])
    assert_verbose_allclose(S, expected, rtol=1e-4, atol=1e-4, name="S")
    _check_orthonormal(U)
    _check_orthonormal(Vh.t())


@pytest.mark.parametrize("shape, rank", [((1, 50), 1), ((50, 1), 1), ((40, 30), 30), ((150, 100), 60)])
def test_full_svd_path(shape, rank):
    W = torch.randn(shape)
    assert svd_path(shape, rank) == "full"
    U, S, Vh = ops.truncated_svd(W, rank)
    _, S_ref, _ = ops.truncated_svd_ref(W, rank)
    assert_verbose_allclose(S, S_ref, rtol=1e-5, atol=1e-6, name="S")
    assert_verbose_allclose((U * S) @ Vh if rank == min(shape) else S, W if rank == min(shape) else S_ref,
                            rtol=1e-4, atol=1e-4, name="reconstruction")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    W = _with_spectrum((100, 90), 0.8 ** torch.arange(90.0)).to(dtype)
    U, S, Vh = ops.truncated_svd(W, 5)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert U.dtype == S.dtype == Vh.dtype == want
    _, S_ref, _ = ops.truncated_svd_ref(W, 5)
    assert_verbose_allclose(S, S_ref, rtol=1e-3, atol=0, name="S")


def test_no_graph_for_parameters():
    W = torch.nn.Parameter(torch.randn(100, 80))
    assert all(not t.requires_grad for t in ops.truncated_svd(W, 5))


def test_deterministic_and_leaves_global_rng():
    W = torch.randn(100, 80)
    rng = torch.get_rng_state()
    a = ops.truncated_svd(W, 6)
    assert torch.equal(rng, torch.get_rng_state())
    b = ops.truncated_svd(W, 6)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for x, y in zip(ops.truncated_svd(W, 6, generator=g1), ops.truncated_svd(W, 6, generator=g2), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("shape", [(100, 120), (20, 30)])  # randomized path, full-SVD path
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises(value, shape):
    W = torch.randn(shape)
    W[4, 7] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.truncated_svd(W, 4)


def test_non_convergence_falls_back(monkeypatch):
    W = _with_spectrum((100, 80), 0.8 ** torch.arange(80.0))

    def broken(A, rank, *args):
        nan = torch.full((), float("nan"))
        return nan.expand(A.shape[-2], rank), nan.expand(rank), nan.expand(rank, A.shape[-1])

    monkeypatch.setattr(tsvd_mod, "_randomized", broken)
    with pytest.warns(RuntimeWarning, match="falling back to torch.linalg.svd"):
        U, S, Vh = ops.truncated_svd(W, 4)
    _, S_ref, _ = ops.truncated_svd_ref(W, 4)
    assert_verbose_allclose(S, S_ref, rtol=1e-6, name="S")


@pytest.mark.parametrize("cond", [1e2, 1e7])  # 1e7 defeats Cholesky-QR in fp32: the fallback takes over
def test_orthonormalize_cholesky(cond):
    Y = _with_spectrum((200, 12), torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 12))
    Q = orthonormalize(Y, method="cholesky")
    _check_orthonormal(Q, 1e-5)
    assert torch.linalg.matrix_norm(Y - Q @ (Q.t() @ Y)) <= 1e-5


@pytest.mark.parametrize("bad, err", [
    (lambda: orthonormalize(torch.randn(10, 3), method="gram-schmidt"), ValueError),
    (lambda: ops.truncated_svd(torch.randn(10), 2), ValueError),
    (lambda: ops.truncated_svd(torch.randn(2, 2, 3, 3), 2), ValueError),
    (lambda: ops.truncated_svd(torch.randn(5, 4), 5), ValueError),
    (lambda: ops.truncated_svd(torch.randn(5, 4), 0), ValueError),
    (lambda: ops.truncated_svd(torch.randn(5, 4), 2.0), TypeError),
    (lambda: ops.truncated_svd(torch.randn(5, 4), 2, n_iter=-1), ValueError),
    (lambda: ops.truncated_svd(torch.ones(5, 4, dtype=torch.int32), 2), TypeError),
    (lambda: ops.truncated_svd(torch.zeros(0, 4), 1), ValueError),
])
def test_errors(bad, err):
    with pytest.raises(err):
        bad()


@pytest.mark.gpu
def test_gpu_batched():
    s = 4.0 * 0.9 ** torch.arange(768.0)
    W = _with_spectrum((4, 768, 3072), s).cuda()
    U, S, Vh = ops.truncated_svd(W, 64)
    assert_verbose_allclose(S.cpu(), s[:64].expand(4, 64), rtol=1e-3, atol=0, name="S")
    _check_orthonormal(U.cpu())
    _check_orthonormal(Vh.transpose(-1, -2).cpu())


def test_small_svd_gram_matches_svd_and_declines_tiny_sigmas():
    """The CPU's final k x k step: eigh of the fp64 Gram agrees with the SVD, and hands back (None) when a
    kept singular value is below 1e-4 sigma_1, where squaring would cost it its accuracy."""
    B = _with_spectrum((2, 12, 70), 3.0 * 0.7 ** torch.arange(12.0))
    W, S, Vh = tsvd_mod._small_svd_gram(B, 9)
    U_ref, S_ref, Vh_ref = torch.linalg.svd(B.double(), full_matrices=False)
    assert_verbose_allclose(S.double(), S_ref[..., :9], rtol=1e-5, atol=0, name="S")
    assert_verbose_allclose((W * S[..., None, :]) @ Vh, (U_ref[..., :9] * S_ref[..., None, :9]) @ Vh_ref[..., :9, :],
                            rtol=0, atol=1e-5, name="rank-9 reconstruction")
    _check_orthonormal(Vh.transpose(-1, -2))
    low = _with_spectrum((12, 70), torch.tensor([5.0, 1.0, 1e-4]))
    assert tsvd_mod._small_svd_gram(low, 3) is None
    assert tsvd_mod._small_svd_gram(low, 2) is not None


@pytest.mark.parametrize(("decay", "want"), [(0.8, "fp32"), (0.55, "fp64")])
def test_small_svd_gram_fp32_only_for_a_short_kept_spectrum(decay, want, monkeypatch):
    """fp32 input: the Gram is formed in fp32 while every kept sigma is above _GRAM32_MIN_RATIO sigma_1 (here
    0.8^11 = 0.086), else in fp64 (0.55^11 = 1.4e-3); both agree with the SVD to the same tolerance."""
    B = _with_spectrum((3, 14, 90), 2.0 * decay ** torch.arange(14.0))
    used = []
    original = tsvd_mod._gram_eigh
    monkeypatch.setattr(tsvd_mod, "_gram_eigh", lambda X, *a: used.append(X.dtype) or original(X, *a))
    W, S, Vh = tsvd_mod._small_svd_gram(B, 12)
    assert used[-1] == {"fp32": torch.float32, "fp64": torch.float64}[want]
    assert W.dtype == S.dtype == Vh.dtype == torch.float32
    U_ref, S_ref, Vh_ref = torch.linalg.svd(B.double(), full_matrices=False)
    assert_verbose_allclose(S.double(), S_ref[..., :12], rtol=1e-4, atol=0, name="S")
    assert_verbose_allclose((W * S[..., None, :]) @ Vh, (U_ref[..., :12] * S_ref[..., None, :12]) @ Vh_ref[..., :12, :],
                            rtol=0, atol=2e-5, name="rank-12 reconstruction")
    _check_orthonormal(W)
    _check_orthonormal(Vh.transpose(-1, -2))


def test_cholesky_qr1_spans_y_and_hands_dependent_columns_to_householder():
    Y = torch.randn(60, 7, generator=torch.Generator().manual_seed(3))
    Q = tsvd_mod._cholesky_qr1(Y)
    _check_orthonormal(Q, tol=1e-4)
    assert_verbose_allclose(Q @ (Q.T @ Y), Y, rtol=0, atol=1e-4, name="projection of Y on span(Q)")
    dep = torch.cat([Y[:, :3], Y[:, :1]], dim=1)  # a repeated column: the Gram is singular
    Qd = tsvd_mod._cholesky_qr1(dep)
    assert torch.isfinite(Qd).all()
    assert torch.equal(Qd, tsvd_mod._householder(dep))


def test_sketch_argument_batches_without_changing_each_result():
    """A given sketch replaces the generator's draw; with one sketch per matrix, a batched call answers each
    matrix as the same call on it alone (what Q3R's batched rebuild relies on for DDP)."""
    W = _with_spectrum((3, 90, 110), 5.0 * 0.85 ** torch.arange(90.0))
    rank, over = 6, 5
    width = tsvd_mod.sketch_width(W.shape, rank, over)
    assert width == rank + over
    g = torch.Generator().manual_seed(11)
    omega = torch.randn(3, 110, width, generator=g)
    U, S, Vh = ops.truncated_svd(W, rank, oversample=over, n_iter=2, sketch=omega)
    assert torch.equal(S, ops.truncated_svd(W, rank, oversample=over, n_iter=2,
                                            generator=torch.Generator().manual_seed(11))[1])
    for i in range(3):
        Ui, Si, Vhi = ops.truncated_svd(W[i], rank, oversample=over, n_iter=2, sketch=omega[i])
        assert_verbose_allclose(S[i], Si, rtol=1e-5, atol=0, name=f"S[{i}]")
        assert_verbose_allclose((U[i] * S[i]) @ Vh[i], (Ui * Si) @ Vhi, rtol=0, atol=1e-4, name=f"rank-{rank} part")
    with pytest.raises(ValueError, match="sketch has shape"):
        ops.truncated_svd(W, rank, oversample=over, sketch=omega[..., :-1])
    with pytest.raises(TypeError):
        ops.truncated_svd(W, rank, oversample=over, sketch=omega.long())


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e5])
def test_cholesky_qr1x2_orthonormal_or_householder(cond):
    """Two one-pass Cholesky-QRs give an orthonormal basis of span(Y) while the fp32 Gram resolves Y; past
    that (cond 1e5) the first pass hands over to Householder, so the result is orthonormal either way."""
    g = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(200, 30, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64)).Q
    Y = ((U * torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 30, dtype=torch.float64)) @ V.T).float()
    Q = tsvd_mod._cholesky_qr1x2(Y)
    _check_orthonormal(Q, tol=1e-5)
    assert_verbose_allclose(Q @ (Q.T @ Y), Y, rtol=0, atol=1e-5, name="projection of Y on span(Q)")


@pytest.mark.parametrize("zero", [False, True])
def test_deferred_check_equals_truncated_svd_or_flags_the_failure(zero, ortho):
    """truncated_svd_deferred returns truncated_svd's first attempt and its convergence check as a device flag,
    with no host sync of its own beyond the orthonormalisation's and the small SVD's: equal results where the
    flag holds; a zero W under Cholesky-QR (the attempt truncated_svd repeats with Householder) does not pass."""
    from lowrank_kernels.testing import count_gpu_cost

    W = torch.zeros(3, 120, 100) if zero else torch.stack([_with_spectrum((120, 100), 0.9 ** torch.arange(100.0))
                                                           for _ in range(3)])
    sketch = torch.randn(3, 100, 26, generator=torch.Generator().manual_seed(1))
    with count_gpu_cost() as deferred_cost:
        U, S, Vh, ok = tsvd_mod.truncated_svd_deferred(W, 10, sketch=sketch)
    with count_gpu_cost() as checked_cost:
        U2, S2, Vh2 = ops.truncated_svd(W, 10, sketch=sketch)
    if zero and ortho == "cholesky":
        # the NaN basis makes the small eigh raise (then truncated_svd's result, checked: ok None) or is flagged
        assert ok is None or not bool(ok), "a failed first attempt must not pass"
        if ok is None:
            assert torch.equal(S, S2) and torch.equal(U, U2) and torch.equal(Vh, Vh2)
        return
    assert ok is not None and ok.dtype == torch.bool and ok.dim() == 0 and bool(ok)
    for a, b, name in ((U, U2, "U"), (S, S2, "S"), (Vh, Vh2, "Vh")):
        assert torch.equal(a, b), name
    assert deferred_cost.syncs == checked_cost.syncs - 1, (deferred_cost.syncs, checked_cost.syncs)
    # the full-SVD path has nothing to check
    assert tsvd_mod.truncated_svd_deferred(W[:, :40, :40], 10)[3] is None
