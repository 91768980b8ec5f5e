"""Batched power iteration: spectral_norm / stable_rank (Triton kernel and reference), warm start, factored."""

import math
import os
import subprocess
import sys

import pytest
import torch

from lowrank_kernels import ops
from lowrank_kernels.ops.power_iteration import initial_vectors
from lowrank_kernels.testing import assert_verbose_allclose


def _with_spectrum(m: int, n: int, s: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``W (m, n)`` with singular values ``s`` (len <= min(m, n)), built in fp64."""
    g = torch.Generator().manual_seed(m * 1000 + n)
    k = s.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return ((U * s.double()) @ V.t()).to(dtype)


def _known_spectra() -> dict[str, torch.Tensor]:
    return {
        "decaying": _with_spectrum(40, 24, 3.0 * 0.6 ** torch.arange(24.0)),
        "flat": _with_spectrum(20, 33, torch.full((20,), 2.5)),
        "rank_deficient": _with_spectrum(30, 30, torch.tensor([4.0, 1.5, 0.5])),
        "row": torch.randn(1, 37),
        "column": torch.randn(29, 1),
        "zero": torch.zeros(12, 9),
        "transposed_view": _with_spectrum(45, 18, 0.5 ** torch.arange(18.0)).t(),
    }


def _dense_sigma(mats) -> torch.Tensor:
    return torch.stack([torch.linalg.matrix_norm(W.double(), 2) for W in mats]).float()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).abs() / b.double().clamp_min(1e-30)


@pytest.mark.parametrize("backend_fixture", ["torch_backend", "triton_backend"])
def test_known_spectra_converge(backend_fixture, request):
    request.getfixturevalue(backend_fixture)
    spectra = _known_spectra()
    mats = list(spectra.values())
    sigma = ops.spectral_norm(mats, iters=40, tol=1e-7)
    expected = _dense_sigma(mats)
    assert sigma.dtype == torch.float32 and sigma.shape == (len(mats),)
    for name, s, e in zip(spectra, sigma, expected, strict=True):
        if name == "zero":
            assert s.item() == 0.0
        else:
            assert _rel_err(s, e) <= 1e-3, f"{name}: sigma {s.item():.6g} vs matrix_norm {e.item():.6g}"
    srank = ops.stable_rank(mats, iters=40, tol=1e-7)
    fro = torch.stack([W.double().square().sum() for W in mats])
    for name, r, f, e in zip(spectra, srank, fro, expected.double(), strict=True):
        want = 0.0 if name == "zero" else (f / e**2).item()
        assert r.item() == pytest.approx(want, rel=2e-3, abs=1e-6), name


@pytest.mark.parametrize("split", [False, True])  # one fused launch / two launches per iteration with atomics
@pytest.mark.parametrize("block_n", [None, 16])  # None: vectors in registers; 16: streamed through scratch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_equals_reference(dtype, block_n, split):
    pytest.importorskip("triton")
    from lowrank_kernels.kernels.power_iteration import power_iteration_triton

    # (150, 21) spans several work items of the split variant (rows are shared out over 4 "SMs" on the CPU).
    mats = [torch.randn(150, 21).to(dtype), torch.randn(13, 50).to(dtype), torch.randn(48, 33).to(dtype).t(),
            torch.randn(1, 19).to(dtype), torch.zeros(6, 6, dtype=dtype)]
    v0 = initial_vectors(mats)
    v = v0.clone()
    sigma, fro = power_iteration_triton(mats, v, 3, 0.0, block_n=block_n, split=split)
    sigma_ref, fro_ref, v_ref = ops.spectral_norm_ref(mats, 3, 0.0, v0)
    assert_verbose_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-6, name="sigma")
    assert_verbose_allclose(fro, fro_ref, rtol=1e-5, atol=1e-5, name="fro_sq")
    assert_verbose_allclose(v, v_ref, rtol=1e-4, atol=1e-5, name="vectors")


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_vectorized_rows(dtype, split):
    """Groups whose unit-stride runs are 16-byte aligned multiples take the vector-load path (VEC > 1)."""
    pytest.importorskip("triton")
    from lowrank_kernels.kernels.power_iteration import _oriented_meta, _vector_width, power_iteration_triton

    rows = [torch.randn(72, 16).to(dtype), torch.randn(40, 32).to(dtype), torch.randn(20, 56).to(dtype)[:, 8:24]]
    cols = [torch.randn(24, 80).to(dtype), torch.randn(16, 64).to(dtype).t()]  # A = W^T / a column-major W
    mats = rows + cols
    vec, size = 16 // mats[0].element_size(), mats[0].element_size()
    entries = [(A.data_ptr(), M, N, sm, sn, 0) for A, M, N, sm, sn in map(_oriented_meta, mats)]
    assert _vector_width(entries[:3], size, True, 8) == vec
    assert _vector_width(entries[3:], size, False, 8) == vec
    assert _vector_width(entries[3:], size, False, 2) == 1  # a row block must hold whole vectors
    assert _vector_width(entries[:1] + [(entries[1][0] + 2, *entries[1][1:])], size, True, 8) == 1
    v0 = initial_vectors(mats)
    v = v0.clone()
    sigma, fro = power_iteration_triton(mats, v, 3, 0.0, split=split)
    sigma_ref, fro_ref, v_ref = ops.spectral_norm_ref(mats, 3, 0.0, v0)
    assert_verbose_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-6, name="sigma")
    assert_verbose_allclose(fro, fro_ref, rtol=1e-5, atol=1e-5, name="fro_sq")
    assert_verbose_allclose(v, v_ref, rtol=1e-4, atol=1e-5, name="vectors")


def test_mixed_dtypes_and_layouts_dispatch(triton_backend, monkeypatch):
    mats = [torch.randn(30, 20), torch.randn(20, 30, dtype=torch.float16), torch.randn(25, 40).t(),
            torch.randn(16, 24, dtype=torch.float64), torch.randn(40, 50)[::2, ::2]]
    from lowrank_kernels.kernels import power_iteration as kernel

    launches = []
    launcher = kernel.power_iteration_triton
    monkeypatch.setattr(kernel, "power_iteration_triton", lambda *a, **k: launches.append(1) or launcher(*a, **k))
    state = ops.PowerIterationState()
    sigma, fro = ops.spectral_stats(mats, iters=4, tol=0.0, state=state)
    assert launches == [1], "the Triton backend was not used"
    monkeypatch.setenv("LOWRANK_KERNELS_BACKEND", "torch")
    ref_state = ops.PowerIterationState()
    sigma_ref, fro_ref = ops.spectral_stats(mats, iters=4, tol=0.0, state=ref_state)
    assert_verbose_allclose(sigma, sigma_ref, rtol=1e-5, atol=1e-6, name="sigma")
    assert_verbose_allclose(fro, fro_ref, rtol=1e-5, atol=1e-5, name="fro_sq")
    assert_verbose_allclose(state.get(mats), ref_state.get(mats), rtol=1e-4, atol=1e-5, name="vectors")


@pytest.mark.parametrize("variant", ["torch", "fused", "split"])
def test_early_stop_matches(variant):
    """tol stops each matrix on its own; every implementation stops at the same iteration."""
    mats = [_with_spectrum(24, 16, 0.3 ** torch.arange(16.0)), _with_spectrum(20, 20, 0.95 ** torch.arange(20.0))]
    v0 = initial_vectors(mats)
    if variant == "torch":
        sigma = ops.spectral_norm(mats, iters=25, tol=1e-4)
    else:
        pytest.importorskip("triton")
        from lowrank_kernels.kernels.power_iteration import power_iteration_triton

        sigma, _ = power_iteration_triton(mats, v0.clone(), 25, 1e-4, split=variant == "split")
    sigma_ref, _, _ = ops.spectral_norm_ref(mats, 25, 1e-4, v0)
    assert_verbose_allclose(sigma, sigma_ref, rtol=1e-5, name="sigma")
    assert _rel_err(sigma[0], _dense_sigma(mats[:1])[0]) <= 1e-3


@pytest.mark.parametrize("backend_fixture", ["torch_backend", "triton_backend"])
def test_warm_start_one_iteration_per_step(backend_fixture, request):
    request.getfixturevalue(backend_fixture)
    g = torch.Generator().manual_seed(1)
    W0 = _with_spectrum(48, 32, 2.0 * 0.7 ** torch.arange(32.0))
    drift = torch.randn(48, 32, generator=g) * 1e-3
    state = ops.PowerIterationState()
    # From a cold start, 1 iteration per step converges within a few steps ...
    errs = []
    for t in range(12):
        W = W0 + t * drift
        errs.append(_rel_err(ops.spectral_norm([W], iters=1, state=state)[0], _dense_sigma([W])[0]).item())
    assert errs[0] > 1e-3, "the cold first step should not be converged yet (test would be vacuous)"
    assert max(errs[-4:]) <= 1e-3, errs
    # ... and then stays converged while the matrix drifts.
    for t in range(12, 18):
        W = W0 + t * drift
        assert _rel_err(ops.spectral_norm([W], iters=1, state=state)[0], _dense_sigma([W])[0]) <= 1e-3


def test_state_keyed_by_shapes():
    a, b = torch.randn(8, 5), torch.randn(6, 9)
    state = ops.PowerIterationState()
    ops.spectral_norm([a, b], iters=2, state=state)
    assert len(state) == 1 and state.get([a, b]).shape == (5 + 6,)
    ops.spectral_norm([b], iters=2, state=state)
    assert len(state) == 2
    before = state.get([a, b]).clone()
    ops.spectral_norm([a + 1, b], iters=1, state=state)  # same shapes: warm-started and updated
    assert len(state) == 2 and not torch.equal(before, state.get([a, b]))
    restored = ops.PowerIterationState()
    restored.load_state_dict(state.state_dict())
    assert torch.equal(restored.get([a, b]), state.get([a, b]))
    state.reset()
    assert len(state) == 0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy inf * 0 (interpreter)
@pytest.mark.parametrize("backend_fixture", ["torch_backend", "triton_backend"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_matrix_flags_itself_and_keeps_state(value, backend_fixture, request):
    request.getfixturevalue(backend_fixture)
    bad = torch.randn(7, 5)
    bad[2, 3] = value
    good = torch.randn(9, 4)
    state = ops.PowerIterationState()
    sigma = ops.spectral_norm([good, bad], iters=3, state=state)
    assert math.isfinite(sigma[0].item()) and not math.isfinite(sigma[1].item())
    assert torch.isfinite(state.get([good, bad])).all()


@pytest.mark.parametrize("case", ["single", "batched", "list"])
def test_factored_matches_dense(case):
    if case == "single":
        U, V = torch.randn(40, 6), torch.randn(6, 33)
        dense = [U @ V]
    elif case == "batched":
        U, V = torch.randn(3, 20, 5), torch.randn(3, 5, 17)
        dense = list(U @ V)
    else:
        U = [torch.randn(30, 4), torch.zeros(12, 3), torch.randn(9, 7), torch.randn(16, 2) @ torch.randn(2, 5)]
        V = [torch.randn(4, 25), torch.randn(3, 8), torch.randn(7, 11), torch.randn(5, 21)]
        dense = [u @ v for u, v in zip(U, V, strict=True)]
    sigma = ops.spectral_norm_factored(U, V)
    srank = ops.stable_rank_factored(U, V)
    expected = _dense_sigma(dense)
    fro = torch.stack([d.double().square().sum() for d in dense])
    expected_rank = torch.where(expected > 0, fro / expected.double().clamp_min(1e-30) ** 2, torch.zeros_like(fro))
    shape = () if case == "single" else (len(dense),)
    assert sigma.shape == shape and srank.shape == shape and sigma.dtype == torch.float32
    assert_verbose_allclose(sigma.reshape(-1), expected, rtol=1e-5, atol=1e-6, name="sigma")
    assert_verbose_allclose(srank.reshape(-1), expected_rank, rtol=1e-4, atol=1e-6, name="stable_rank")


@pytest.mark.parametrize("bad, err", [
    (lambda: ops.spectral_norm([]), ValueError),
    (lambda: ops.spectral_norm(torch.randn(3, 3)), TypeError),
    (lambda: ops.spectral_norm([torch.randn(3)]), ValueError),
    (lambda: ops.spectral_norm([torch.zeros(0, 3)]), ValueError),
    (lambda: ops.spectral_norm([torch.ones(3, 3, dtype=torch.int64)]), TypeError),
    (lambda: ops.spectral_norm([torch.randn(3, 3)], iters=0), ValueError),
    (lambda: ops.spectral_norm([torch.randn(3, 3)], tol=-1.0), ValueError),
    (lambda: ops.spectral_norm_factored(torch.randn(5, 3), torch.randn(4, 6)), ValueError),
    (lambda: ops.spectral_norm_factored([torch.randn(5, 3)], [torch.randn(3, 6)] * 2), ValueError),
    (lambda: ops.spectral_norm_factored(torch.randn(5, 3), [torch.randn(3, 6)]), TypeError),
    (lambda: ops.spectral_norm_factored(torch.randn(5, 0), torch.randn(0, 6)), ValueError),
    (lambda: ops.stable_rank_factored([torch.randn(5, 2), torch.randn(4, 0)], [torch.randn(2, 3), torch.randn(0, 3)]),
     ValueError),
])
def test_errors(bad, err):
    with pytest.raises(err):
        bad()


def test_factored_rank_zero_message():
    with pytest.raises(ValueError, match=r"pair 0: .*\(5, 0\).*rank-0"):
        ops.spectral_norm_factored(torch.randn(5, 0), torch.randn(0, 6))


@pytest.mark.parametrize("backend_fixture", ["torch_backend", "triton_backend"])
def test_scaled_inputs_stay_finite(backend_fixture, request):
    """Issue 17.4: finite fp32 in, finite sigma_max and stable rank out, rtol 1e-3, across fp32's range."""
    request.getfixturevalue(backend_fixture)
    base = _with_spectrum(12, 7, 2.0 * 0.5 ** torch.arange(7.0), dtype=torch.float64)
    cases = {"full_1e20": torch.full((3, 3), 1e20), "full_1e-30": torch.full((3, 3), 1e-30),
             "near_max": torch.full((2, 2), 1e38), "subnormal": torch.full((4, 3), 1e-40)}
    for e in (-35, -12, 12, 35):
        cases[f"spectrum_1e{e}"] = (base * 10.0 ** e).float()
    mats = list(cases.values())
    sigma = ops.spectral_norm(mats, iters=60, tol=1e-7)
    srank = ops.stable_rank(mats, iters=60, tol=1e-7)
    assert torch.isfinite(sigma).all() and torch.isfinite(srank).all(), (sigma, srank)
    for (name, W), s, r in zip(cases.items(), sigma, srank, strict=True):
        sv = torch.linalg.svdvals(W.double())
        assert _rel_err(s, sv[0]) <= 1e-3, f"{name}: sigma {s.item():.6g} vs {sv[0].item():.6g}"
        want = (sv / sv[0]).square().sum()
        assert _rel_err(r, want) <= 1e-3, f"{name}: stable rank {r.item():.6g} vs {want.item():.6g}"
    # ||W||_F^2 of full_1e20 (9e40) is beyond fp32: reported as inf, never as a wrong finite number; that of
    # a (64, 64) matrix of 1e-20 (4e-37) is representable, though the square of its scale is not
    tiny = torch.full((64, 64), 1e-20)
    _, fro = ops.spectral_stats([mats[0], tiny], iters=5)
    assert fro[0].item() == float("inf")
    assert abs(fro[1].item() / (64 * 64 * 1e-40) - 1) <= 1e-3, fro[1].item()


def test_factored_scaled_inputs_stay_finite():
    U, V = torch.full((6, 2), 1e20), torch.full((2, 5), 1e-25) * torch.tensor([[1.0], [-2.0]])
    assert math.isfinite(ops.stable_rank_factored(U, V).item())
    dense = U.double() @ V.double()
    assert _rel_err(ops.spectral_norm_factored(U, V), torch.linalg.matrix_norm(dense, 2)) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_transformer_weights(dtype, split, triton_backend):
    torch.manual_seed(0)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 2 + [(4100, 2500), (3000, 5000)]
    mats = [(torch.randn(s, device="cuda") / s[1] ** 0.5).to(dtype) for s in shapes]
    mats.append(torch.randn(2000, 3000, device="cuda").to(dtype).t())
    v0 = initial_vectors(mats)
    v = v0.clone()
    from lowrank_kernels.kernels.power_iteration import power_iteration_triton

    sigma, fro = power_iteration_triton(mats, v, 5, 0.0, split=split)
    sigma_ref, fro_ref, v_ref = ops.spectral_norm_ref(mats, 5, 0.0, v0)
    assert_verbose_allclose(sigma, sigma_ref, rtol=1e-4, name="sigma")
    assert_verbose_allclose(fro, fro_ref, rtol=1e-4, name="fro_sq")
    assert_verbose_allclose(v, v_ref, rtol=1e-3, atol=1e-4, name="vectors")


@pytest.mark.gpu
def test_gpu_converges_to_matrix_norm(triton_backend):
    mats = [_with_spectrum(3072, 768, 0.9 ** torch.arange(768.0)).cuda(),
            _with_spectrum(768, 2304, 0.8 ** torch.arange(768.0)).cuda().to(torch.bfloat16)]
    sigma = ops.spectral_norm(mats, iters=100, tol=1e-7)
    assert (_rel_err(sigma.cpu(), _dense_sigma([m.cpu() for m in mats])) <= 1e-3).all()


def test_split_work_items_cover_rows_once():
    pytest.importorskip("triton")
    from lowrank_kernels.kernels.power_iteration import _use_split, _work_items

    shapes = [(2304, 768), (768, 768), (3072, 768), (5, 3)]
    items = _work_items(shapes, 8, torch.device("cpu"))
    for j, (M, _) in enumerate(shapes):
        spans = sorted((r0, r1) for k, r0, r1 in items if k == j)
        assert spans[0][0] == 0 and spans[-1][1] == M
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert all(r1 - r0 <= items[0][2] - items[0][1] for r0, r1 in spans)
    assert not _use_split([100, 10_000], 1, torch.device("cpu"))  # the CPU interpreter always runs fused


def test_custom_op_registration():
    """Schema (mutated vectors), fake tensor and autograd registration pass torch.library.opcheck."""
    mats = [torch.randn(8, 5), torch.randn(4, 9)]
    torch.library.opcheck(torch.ops.lowrank_kernels.power_iteration.default,
                          (mats, initial_vectors(mats), ops.power_iteration.inverse_scales(mats), 3, 0.0))


_COMPILE_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lowrank_kernels.kernels import power_iteration as K

common = {"table_ptr": "*i64", "v_ptr": "*fp32", "z_ptr": "*fp32", "CONTIG_N": "constexpr",
          "ONE_BLOCK_N": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "VEC": "constexpr"}
fused = {"w0_ptr": "*bf16", "inv_ptr": "*fp32", **common, "sigma_ptr": "*fp32", "fro_ptr": "*fp32", "iters": "i32",
         "tol": "fp32"}
partial = {"w0_ptr": "*fp32", "inv_ptr": "*fp32", **common, "work_ptr": "*i64", "fro_ptr": "*fp32", "done_ptr": "*i32",
           "FIRST": "constexpr"}
norm = {"table_ptr": "*i64", "v_ptr": "*fp32", "z_ptr": "*fp32", "sigma_ptr": "*fp32", "s_prev_ptr": "*fp32",
        "done_ptr": "*i32", "it": "i32", "tol": "fp32", "BLOCK_N": "constexpr"}
blocks = {"BLOCK_M": 8, "BLOCK_N": 1024}
cases = [(K._power_iteration_kernel, fused, {"CONTIG_N": True, "ONE_BLOCK_N": True, "VEC": 8, **blocks}),
         (K._power_iteration_kernel, fused, {"CONTIG_N": False, "ONE_BLOCK_N": False, "VEC": 1, **blocks}),
         (K._power_iteration_kernel, fused, {"CONTIG_N": False, "ONE_BLOCK_N": True, "VEC": 8, **blocks}),
         (K._power_iteration_partial_kernel, partial,
          {"CONTIG_N": True, "ONE_BLOCK_N": True, "VEC": 4, "FIRST": True, **blocks}),
         (K._power_iteration_partial_kernel, partial,
          {"CONTIG_N": False, "ONE_BLOCK_N": True, "VEC": 4, "FIRST": True, **blocks}),
         (K._power_iteration_normalize_kernel, norm, {"BLOCK_N": 1024})]
try:
    target = GPUTarget("cuda", 90, 32)
    triton.compile(ASTSource(fn=cases[-1][0], signature=cases[-1][1], constexprs=cases[-1][2]), target=target)
except Exception as exc:  # no CUDA toolchain in this triton build
    if "ptxas" in str(exc) or isinstance(exc, (ImportError, FileNotFoundError)):
        print("NO-TOOLCHAIN", exc)
        sys.exit(0)
    raise
for fn, signature, constexprs in cases:
    asm = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target).asm
    assert asm["cubin"]
    # The alignment hints must turn row-major tile loads into 16-byte vector loads.
    assert constexprs.get("VEC", 1) == 1 or "ld.global.v4" in asm["ptx"], (fn.__name__, constexprs)
print("COMPILED", len(cases))
"""


def test_kernels_compile_for_sm90():
    """Compile for an H100 without one: catches what the interpreter lets through (non-constexpr globals,
    loop-carried types, hints). Runs in a subprocess because TRITON_INTERPRET=1 is set in this one."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if "NO-TOOLCHAIN" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and "COMPILED 6" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
