"""Fuzz tests over every public op and module, and the training config.

For each of ``ops.lowrank_matmul``, ``lora_matmul``, ``spectral_norm``, ``stable_rank``,
``spectral_norm_factored``, ``stable_rank_factored``, ``truncated_svd``, ``pad_slices``, ``gather_slices``,
``q3r_apply``, ``nn.LowRankLinear`` and ``nn.LoRALinear``:

* valid inputs drawn by hypothesis match the ``*_ref`` function or the fp64 formula;
* invalid inputs (a valid call with one argument broken: wrong shape, integer or mixed dtype, a tensor
  on the meta device among CPU ones, a non-tensor, NaN/Inf where refused, a zero/negative/non-int rank,
  out-of-range hyperparameters) raise ``ValueError`` or ``TypeError``, never another exception;
* the size limit (``_checks.MAX_NUMEL``) refuses huge ``expand``-ed inputs before allocating.

And the compiled op, called directly through ``torch.ops`` with ~50 bad argument sets in a child process,
never takes the process down. Examples are bounded (``max_examples``) so the file runs in well under a minute
on one core.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowrank_kernels import nn as lk_nn
from lowrank_kernels import ops
from lowrank_kernels.app.config import TrainConfig, field_type, from_dict
from lowrank_kernels.app.errors import ConfigError
from lowrank_kernels.ops.pad_slices import gather_slices_ref, pad_slices_ref
from lowrank_kernels.ops.q3r_apply import q3r_apply_ref

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
OK_ERRORS = (ValueError, TypeError)
EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _raises_cleanly(call, label: str) -> Exception:
    """``call()`` must raise ValueError or TypeError; any other outcome fails with the case's label."""
    try:
        call()
    except OK_ERRORS as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the point: name the wrong exception type
        raise AssertionError(f"{label}: raised {type(exc).__name__} (want ValueError/TypeError): {exc}") from exc
    raise AssertionError(f"{label}: accepted an invalid input")


def _close(got: torch.Tensor, want64: torch.Tensor, bound: torch.Tensor | float, label: str) -> None:
    err = (got.double() - want64).abs()
    assert bool((err <= bound).all()), f"{label}: max error {err.max().item():.3g}"


# ----------------------------------------------------------------------------------- lowrank_matmul
@st.composite
def _lowrank_case(draw):
    lead = draw(st.lists(st.integers(0, 4), min_size=0, max_size=2))
    n_in, n_out, r = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]))
    return lead, n_in, n_out, r, dtype, draw(st.booleans()), draw(st.integers(0, 2**16))


def _matmul_bound(x, U, V, bias, dtype):
    """Rounding bound of ``(x V^T) U^T + bias`` computed in ``dtype``: products of absolute values."""
    absprod = (x.double().abs() @ V.double().abs().T) @ U.double().abs().T
    if bias is not None:
        absprod = absprod + bias.double().abs()
    k = x.shape[-1] + V.shape[0] + 4
    return k * EPS[dtype] * absprod + 1e-300


@FUZZ
@given(_lowrank_case())
def test_lowrank_matmul_matches_fp64_formula(case):
    lead, n_in, n_out, r, dtype, has_bias, seed = case
    g = _gen(seed)
    x, U, V = _randn(g, *lead, n_in, dtype=dtype), _randn(g, n_out, r, dtype=dtype), _randn(g, r, n_in, dtype=dtype)
    bias = _randn(g, n_out, dtype=dtype) if has_bias else None
    y = ops.lowrank_matmul(x, U, V, bias)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    want = (x.double() @ V.double().T) @ U.double().T + (0 if bias is None else bias.double())
    _close(y, want, _matmul_bound(x, U, V, bias, dtype), "lowrank_matmul")


def _lowrank_bad(g):
    x, U, V, b = _randn(g, 3, 5), _randn(g, 4, 2), _randn(g, 2, 5), _randn(g, 4)
    meta = torch.empty(4, 2, device="meta")
    return {
        "x in-features": lambda: ops.lowrank_matmul(_randn(g, 3, 6), U, V, b),
        "rank mismatch": lambda: ops.lowrank_matmul(x, _randn(g, 4, 3), V, b),
        "rank 0": lambda: ops.lowrank_matmul(x, torch.empty(4, 0), torch.empty(0, 5), b),
        "V 3-D": lambda: ops.lowrank_matmul(x, U, V[None], b),
        "x 0-D": lambda: ops.lowrank_matmul(torch.tensor(1.0), U, V, b),
        "bias length": lambda: ops.lowrank_matmul(x, U, V, _randn(g, 5)),
        "bias 2-D": lambda: ops.lowrank_matmul(x, U, V, b[None]),
        "int x": lambda: ops.lowrank_matmul(x.long(), U, V, b),
        "mixed dtype": lambda: ops.lowrank_matmul(x, U.double(), V, b),
        "U on meta": lambda: ops.lowrank_matmul(x, meta, V, b),
        "U a list": lambda: ops.lowrank_matmul(x, U.tolist(), V, b),
        "expanded x": lambda: ops.lowrank_matmul(torch.randn(1, 5).expand(2**40, 5), U, V, b),
        "huge output": lambda: ops.lowrank_matmul(torch.randn(1, 1).expand(2**31, 1), torch.randn(2**4, 1),
                                                  torch.randn(1, 1)),
    }


# -------------------------------------------------------------------------------------- lora_matmul
@FUZZ
@given(_lowrank_case(), st.floats(-4, 4, allow_nan=False))
def test_lora_matmul_matches_fp64_formula(case, scaling):
    lead, n_in, n_out, r, dtype, has_bias, seed = case
    g = _gen(seed)
    x, W = _randn(g, *lead, n_in, dtype=dtype), _randn(g, n_out, n_in, dtype=dtype)
    A, B = _randn(g, r, n_in, dtype=dtype), _randn(g, n_out, r, dtype=dtype)
    bias = _randn(g, n_out, dtype=dtype) if has_bias else None
    y = ops.lora_matmul(x, W, A, B, scaling, bias)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    x64 = x.double()
    want = x64 @ W.double().T + scaling * (x64 @ A.double().T) @ B.double().T
    if bias is not None:
        want = want + bias.double()
    bound = (_matmul_bound(x, B, A, None, dtype) * (abs(scaling) + 1)
             + (x.shape[-1] + 4) * EPS[dtype] * (x64.abs() @ W.double().abs().T)
             + (0 if bias is None else EPS[dtype] * bias.double().abs()))
    _close(y, want, 2 * bound, "lora_matmul")


def _lora_bad(g):
    x, W, A, B, b = _randn(g, 3, 5), _randn(g, 4, 5), _randn(g, 2, 5), _randn(g, 4, 2), _randn(g, 4)
    return {
        "x in-features": lambda: ops.lora_matmul(_randn(g, 3, 4), W, A, B, 1.0, b),
        "A in-features": lambda: ops.lora_matmul(x, W, _randn(g, 2, 4), B, 1.0, b),
        "B shape": lambda: ops.lora_matmul(x, W, A, _randn(g, 4, 3), 1.0, b),
        "r = 0": lambda: ops.lora_matmul(x, W, torch.empty(0, 5), torch.empty(4, 0), 1.0, b),
        "bias length": lambda: ops.lora_matmul(x, W, A, B, 1.0, _randn(g, 3)),
        "NaN scaling": lambda: ops.lora_matmul(x, W, A, B, math.nan, b),
        "inf scaling": lambda: ops.lora_matmul(x, W, A, B, math.inf, b),
        "str scaling": lambda: ops.lora_matmul(x, W, A, B, "1", b),
        "bool scaling": lambda: ops.lora_matmul(x, W, A, B, True, b),
        "dropout 1": lambda: ops.lora_matmul(x, W, A, B, 1.0, b, dropout=1.0),
        "dropout NaN": lambda: ops.lora_matmul(x, W, A, B, 1.0, b, dropout=math.nan),
        "fp16 W": lambda: ops.lora_matmul(x, W.half(), A, B, 1.0, b),
        "int A": lambda: ops.lora_matmul(x, W, A.int(), B, 1.0, b),
        "W on meta": lambda: ops.lora_matmul(x, W.to("meta"), A, B, 1.0, b),
        "expanded x": lambda: ops.lora_matmul(torch.randn(1, 5).expand(2**40, 5), W, A, B, 1.0, b),
    }


# ------------------------------------------------------------------------- spectral_norm / stable_rank
def _with_spectrum(g, m: int, n: int, s: torch.Tensor) -> torch.Tensor:
    """``Q1 diag(s) Q2^T`` in fp64 with random orthonormal ``Q1 (m, k)``, ``Q2 (n, k)``."""
    k = s.numel()
    q1, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (q1 * s) @ q2.T


@st.composite
def _mats_case(draw):
    count = draw(st.integers(1, 4))
    shapes = [(draw(st.integers(1, 12)), draw(st.integers(1, 12))) for _ in range(count)]
    dtypes = [draw(st.sampled_from([torch.float32, torch.float64])) for _ in range(count)]
    scales = [draw(st.sampled_from([1e-3, 1.0, 7.0, 1e3])) for _ in range(count)]
    return shapes, dtypes, scales, draw(st.integers(0, 2**16))


@FUZZ
@given(_mats_case())
def test_spectral_norm_and_stable_rank_match_fp64(case):
    """Matrices with a spectral gap (sigma_2 <= sigma_1 / 2): 100 iterations converge to fp32 accuracy."""
    shapes, dtypes, scales, seed = case
    g = _gen(seed)
    mats = []
    for (m, n), dt, sc in zip(shapes, dtypes, scales, strict=True):
        k = min(m, n)
        s = torch.rand(k, generator=g, dtype=torch.float64) * 0.5
        s[0] = 1.0
        mats.append((_with_spectrum(g, m, n, s) * sc).to(dt))
    sigma = ops.spectral_norm(mats, iters=100, tol=0.0)
    srank = ops.stable_rank(mats, iters=100, tol=0.0)
    assert sigma.shape == srank.shape == (len(mats),)
    for i, W in enumerate(mats):
        w64 = W.double()
        s1 = torch.linalg.matrix_norm(w64, ord=2)
        assert abs(sigma[i].item() - s1.item()) <= 1e-4 * s1.item(), (i, sigma[i].item(), s1.item())
        sr = (w64.square().sum() / s1.square()).item()
        assert abs(srank[i].item() - sr) <= 1e-3 * sr, (i, srank[i].item(), sr)


def _spectral_bad(g):
    W = _randn(g, 4, 3)
    out = {}
    for name, f in (("spectral_norm", ops.spectral_norm), ("stable_rank", ops.stable_rank)):
        out.update({
            f"{name}: one tensor, not a list": lambda f=f: f(W),
            f"{name}: empty list": lambda f=f: f([]),
            f"{name}: 1-D": lambda f=f: f([W[0]]),
            f"{name}: empty matrix": lambda f=f: f([torch.empty(0, 3)]),
            f"{name}: int": lambda f=f: f([W.long()]),
            f"{name}: meta among cpu": lambda f=f: f([W, W.to("meta")]),
            f"{name}: iters 0": lambda f=f: f([W], iters=0),
            f"{name}: iters 2.5": lambda f=f: f([W], iters=2.5),
            f"{name}: iters True": lambda f=f: f([W], iters=True),
            f"{name}: tol -1": lambda f=f: f([W], tol=-1.0),
            f"{name}: tol NaN": lambda f=f: f([W], tol=math.nan),
            f"{name}: expanded": lambda f=f: f([torch.randn(1, 4).expand(2**40, 4)]),
        })
    return out


@st.composite
def _factored_case(draw):
    count = draw(st.integers(1, 3))
    dims = [(draw(st.integers(1, 9)), draw(st.integers(1, 5)), draw(st.integers(1, 9))) for _ in range(count)]
    return dims, draw(st.sampled_from([torch.float32, torch.float64])), draw(st.integers(0, 2**16))


@FUZZ
@given(_factored_case())
def test_factored_spectral_stats_match_fp64(case):
    """``spectral_norm_factored`` / ``stable_rank_factored`` of pairs (U, V) = the fp64 values of ``U V``."""
    dims, dtype, seed = case
    g = _gen(seed)
    Us = [_randn(g, o, r, dtype=dtype) for o, r, _ in dims]
    Vs = [_randn(g, r, i, dtype=dtype) for _, r, i in dims]
    sigma, srank = ops.spectral_norm_factored(Us, Vs), ops.stable_rank_factored(Us, Vs)
    assert sigma.shape == srank.shape == (len(dims),)
    for k, (u, v) in enumerate(zip(Us, Vs, strict=True)):
        w = u.double() @ v.double()
        s1 = torch.linalg.matrix_norm(w, ord=2).item()
        assert abs(sigma[k].item() - s1) <= 1e-5 * s1, (k, sigma[k].item(), s1)
        sr = (w.square().sum() / s1**2).item()
        assert abs(srank[k].item() - sr) <= 1e-4 * sr, (k, srank[k].item(), sr)


def _factored_bad(g):
    U, V = _randn(g, 4, 2), _randn(g, 2, 3)
    out = {}
    for name, f in (("spectral_norm_factored", ops.spectral_norm_factored),
                    ("stable_rank_factored", ops.stable_rank_factored)):
        out.update({
            f"{name}: r = 0": lambda f=f: f([torch.empty(4, 0)], [torch.empty(0, 3)]),
            f"{name}: rank mismatch": lambda f=f: f([U], [_randn(g, 3, 3)]),
            f"{name}: counts differ": lambda f=f: f([U, U], [V]),
            f"{name}: tensor and list": lambda f=f: f(U, [V]),
            f"{name}: 1-D": lambda f=f: f([U[0]], [V]),
            f"{name}: int": lambda f=f: f([U.long()], [V]),
            f"{name}: meta among cpu": lambda f=f: f([U], [V.to("meta")]),
            f"{name}: empty lists": lambda f=f: f([], []),
        })
    return out


# ------------------------------------------------------------------------------------ truncated_svd
@st.composite
def _svd_case(draw):
    big = draw(st.booleans())
    m = draw(st.integers(130, 160) if big else st.integers(1, 20))
    n = draw(st.integers(130, 160) if big else st.integers(1, 20))
    rank = draw(st.integers(1, min(m, n, 8)))
    batch = draw(st.sampled_from([(), (2,)]))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return m, n, rank, batch, dtype, draw(st.integers(0, 2**16))


@FUZZ
@given(_svd_case())
def test_truncated_svd_matches_the_reference(case):
    """A gap after ``rank`` (kept sigma in [1, 2], the rest <= 0.05) makes the top subspace well defined;
    the big shapes take the randomized path."""
    m, n, rank, batch, dtype, seed = case
    g = _gen(seed)
    k = min(m, n)
    mats = []
    for _ in range(batch[0] if batch else 1):
        s = torch.cat([1 + torch.rand(rank, generator=g, dtype=torch.float64),
                       0.05 * torch.rand(k - rank, generator=g, dtype=torch.float64)]).sort(descending=True).values
        mats.append(_with_spectrum(g, m, n, s))
    W = (torch.stack(mats) if batch else mats[0]).to(dtype)
    U, S, Vh = ops.truncated_svd(W, rank)
    Ur, Sr, Vhr = ops.truncated_svd_ref(W, rank)
    assert U.shape == (*batch, m, rank) and S.shape == (*batch, rank) and Vh.shape == (*batch, rank, n)
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(S.double(), Sr.double(), rtol=tol, atol=0), (S, Sr)
    rec, rec_ref = ((u.double() * s.double()[..., None, :]) @ v.double() for u, s, v in ((U, S, Vh), (Ur, Sr, Vhr)))
    assert (rec - rec_ref).abs().max().item() <= 10 * tol * Sr.max().item()


def _svd_bad(g):
    W = _randn(g, 6, 5)
    nan = W.clone()
    nan[2, 3] = math.nan
    inf = W.clone()
    inf[0, 0] = math.inf
    big_nan = _randn(g, 200, 150)
    big_nan[7, 7] = math.nan
    return {
        "rank 0": lambda: ops.truncated_svd(W, 0),
        "rank -1": lambda: ops.truncated_svd(W, -1),
        "rank > min": lambda: ops.truncated_svd(W, 6),
        "rank 2.0": lambda: ops.truncated_svd(W, 2.0),
        "rank True": lambda: ops.truncated_svd(W, True),
        "oversample -1": lambda: ops.truncated_svd(W, 2, oversample=-1),
        "n_iter -1": lambda: ops.truncated_svd(W, 2, n_iter=-1),
        "n_iter 1.5": lambda: ops.truncated_svd(W, 2, n_iter=1.5),
        "1-D": lambda: ops.truncated_svd(W[0], 1),
        "4-D": lambda: ops.truncated_svd(W[None, None], 1),
        "empty": lambda: ops.truncated_svd(torch.empty(0, 5), 1),
        "int": lambda: ops.truncated_svd(W.long(), 1),
        "NaN": lambda: ops.truncated_svd(nan, 2),
        "Inf": lambda: ops.truncated_svd(inf, 2),
        "NaN, randomized path": lambda: ops.truncated_svd(big_nan, 4),
        "sketch shape": lambda: ops.truncated_svd(_randn(g, 200, 150), 4, sketch=torch.randn(150, 3)),
        "sketch on meta": lambda: ops.truncated_svd(_randn(g, 200, 150), 4, sketch=torch.empty(150, 20,
                                                                                                 device="meta")),
        "expanded": lambda: ops.truncated_svd(torch.randn(1, 8).expand(2**40, 8), 2),
    }


# -------------------------------------------------------------------------------- pad / gather slices
def _slices_valid(slices, full: int) -> list[tuple[int, int]] | None:
    """An independent oracle of the slice rules: ints, negatives resolved, non-empty, in range, disjoint."""
    out = []
    for s in slices:
        if len(s) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in s):
            return None
        a, b = (v + full if v < 0 else v for v in s)
        if not (0 <= a < b <= full):
            return None
        out.append((a, b))
    ordered = sorted(out)
    if any(c[0] < p[1] for p, c in zip(ordered, ordered[1:], strict=False)) or not out:
        return None
    return out


@st.composite
def _any_slices(draw):
    full = draw(st.integers(1, 16))
    value = st.integers(-20, 20)
    pair = st.one_of(st.tuples(value, value), st.tuples(value, value), st.tuples(value),
                     st.tuples(st.floats(0, 4), value), st.tuples(st.booleans(), value))
    return full, draw(st.lists(pair, min_size=0, max_size=4)), draw(st.integers(0, 2**16))


@FUZZ
@given(_any_slices(), st.integers(0, 1), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_pad_and_gather_valid_or_clean_error(case, dim, dtype):
    full, slices, seed = case
    g = _gen(seed)
    valid = _slices_valid(slices, full)
    other = 3
    grads = []
    for s in (valid or [(0, 1)] * len(slices)):
        shape = [other, other]
        shape[dim] = s[1] - s[0]
        grads.append(_randn(g, *shape, dtype=dtype))
    if valid is None:
        _raises_cleanly(lambda: ops.pad_slices(grads, slices, full, dim=dim), f"pad_slices {slices} of {full}")
        full_t = _randn(g, *([full, other] if dim == 0 else [other, full]), dtype=dtype)
        _raises_cleanly(lambda: ops.gather_slices(full_t, slices, dim=dim), f"gather_slices {slices} of {full}")
        return
    out = ops.pad_slices(grads, slices, full, dim=dim)
    assert torch.equal(out, pad_slices_ref(grads, valid, full, dim))
    for a, b in zip(ops.gather_slices(out, slices, dim=dim), gather_slices_ref(out, valid, dim), strict=True):
        assert torch.equal(a, b)


def _pad_bad(g):
    a, b = _randn(g, 2, 3), _randn(g, 2, 3)
    return {
        "pad: meta among cpu": lambda: ops.pad_slices([a, b.to("meta")], [(0, 2), (2, 4)], 4),
        "pad: mixed dtypes": lambda: ops.pad_slices([a, b.double()], [(0, 2), (2, 4)], 4),
        "pad: int": lambda: ops.pad_slices([a.long()], [(0, 2)], 4),
        "pad: full_size 2.0": lambda: ops.pad_slices([a], [(0, 2)], 4.0),
        "pad: dim 2": lambda: ops.pad_slices([a], [(0, 2)], 4, dim=2),
        "pad: dim 0.5": lambda: ops.pad_slices([a], [(0, 2)], 4, dim=0.5),
        "pad: tensor not list": lambda: ops.pad_slices(a, [(0, 2)], 4),
        "pad: huge output": lambda: ops.pad_slices([torch.randn(1, 1).expand(1, 2**30)], [(0, 1)], 2**10),
        "gather: 0-D": lambda: ops.gather_slices(torch.tensor(1.0), [(0, 1)]),
        "gather: slices None": lambda: ops.gather_slices(a, None),
        "gather: expanded": lambda: ops.gather_slices(torch.randn(1, 8).expand(2**40, 8), [(0, 1)]),
    }


def test_fake_kernels_check_like_the_compiled_op():
    """On meta tensors (and so under torch.compile tracing) the op refuses what the CPU op refuses, with the
    same error type; valid meta calls get the right shapes."""
    pad, gather = torch.ops.lowrank_kernels.pad_slices, torch.ops.lowrank_kernels.gather_slices
    cases = [
        ("gather (0, 100) of 7 rows", lambda d: gather(torch.ones(7, 4, device=d), [0], [100], 0)),
        ("gather overlap", lambda d: gather(torch.ones(8, 2, device=d), [0, 3], [4, 8], 0)),
        ("gather reversed", lambda d: gather(torch.ones(8, 2, device=d), [5], [2], 0)),
        ("gather negative", lambda d: gather(torch.ones(8, 2, device=d), [-2], [3], 0)),
        ("gather dim", lambda d: gather(torch.ones(8, 2, device=d), [0], [2], 2)),
        ("gather no slices", lambda d: gather(torch.ones(8, 2, device=d), [], [], 0)),
        ("gather starts/stops count", lambda d: gather(torch.ones(8, 2, device=d), [0, 2], [2], 0)),
        ("pad out of range", lambda d: pad([torch.ones(4, 2, device=d)], [6], [10], 8, 0)),
        ("pad overlap", lambda d: pad([torch.ones(4, 2, device=d)] * 2, [0, 2], [4, 6], 8, 0)),
        ("pad size mismatch", lambda d: pad([torch.ones(3, 2, device=d)], [0], [4], 8, 0)),
        ("pad other dim", lambda d: pad([torch.ones(4, 2, device=d), torch.ones(4, 3, device=d)], [0, 4], [4, 8],
                                        8, 0)),
        ("pad ndim", lambda d: pad([torch.ones(4, 2, device=d), torch.ones(4, 2, 1, device=d)], [0, 4], [4, 8],
                                   8, 0)),
        ("pad dtype", lambda d: pad([torch.ones(4, 2, device=d), torch.ones(4, 2, device=d, dtype=torch.float64)],
                                    [0, 4], [4, 8], 8, 0)),
        ("pad full_size 0", lambda d: pad([torch.ones(4, 2, device=d)], [0], [4], 0, 0)),
        ("pad dim", lambda d: pad([torch.ones(4, 2, device=d)], [0], [4], 8, 3)),
        ("pad count", lambda d: pad([torch.ones(4, 2, device=d)], [0, 4], [4, 8], 8, 0)),
        ("pad huge full_size", lambda d: pad([torch.ones(1, 2, device=d)], [0], [1], 2**40, 0)),
        ("pad huge output", lambda d: pad([torch.ones(1, 2**20, device=d)], [0], [1], 2**20, 0)),
    ]
    for label, call in cases:
        kinds = []
        for device in ("cpu", "meta"):
            with pytest.raises(OK_ERRORS) as info:
                call(device)
            kinds.append(info.type)
        assert kinds[0] is kinds[1], f"{label}: cpu raised {kinds[0].__name__}, meta raised {kinds[1].__name__}"
    parts = gather(torch.ones(7, 4, device="meta"), [0, 5], [3, 7], 0)
    assert [tuple(p.shape) for p in parts] == [(3, 4), (2, 4)] and parts[0].device.type == "meta"
    out = pad([torch.ones(2, 3, device="meta")], [1], [3], 5, 0)
    assert tuple(out.shape) == (5, 3) and out.device.type == "meta"


# ---------------------------------------------------------------------------------------- q3r_apply
@st.composite
def _q3r_case(draw):
    m, n = draw(st.integers(1, 10)), draw(st.integers(1, 8))
    cuts = sorted(set(draw(st.lists(st.integers(0, m), min_size=0, max_size=4))))
    spans = [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]
    ks = [draw(st.integers(0, 3)) for _ in spans]
    hp = dict(step=draw(st.integers(1, 50)), lr=draw(st.floats(0, 0.1)),
              betas=(draw(st.floats(0, 0.99)), draw(st.floats(0, 0.9999))), eps=draw(st.floats(1e-10, 1e-3)),
              weight_decay=draw(st.floats(0, 0.5)), lmbda=draw(st.floats(0, 2)))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return m, n, spans, ks, hp, dtype, draw(st.integers(0, 2**16))


@FUZZ
@given(_q3r_case())
def test_q3r_apply_matches_the_eager_reference(case):
    m, n, spans, ks, hp, dtype, seed = case
    g = _gen(seed)
    p, grad = _randn(g, m, n, dtype=dtype), _randn(g, m, n, dtype=dtype)
    m1, m2 = _randn(g, m, n, dtype=dtype) * 0.1, _randn(g, m, n, dtype=dtype).abs() * 0.01
    factors = [(s, e, None, None) if k == 0 else (s, e, _randn(g, e - s, k, dtype=dtype), _randn(g, k, n, dtype=dtype))
               for (s, e), k in zip(spans, ks, strict=True)]
    got = [t.clone() for t in (p, grad, m1, m2)]
    want = [t.clone() for t in (p, grad, m1, m2)]
    ops.q3r_apply(*got, factors, **hp)
    q3r_apply_ref(*want, factors, step=hp["step"], lr=hp["lr"], beta1=hp["betas"][0], beta2=hp["betas"][1],
                  eps=hp["eps"], weight_decay=hp["weight_decay"], lmbda=hp["lmbda"], fused=False)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for name, a, b in zip(("p", "grad", "exp_avg", "exp_avg_sq"), got, want, strict=True):
        assert torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-2), f"{name}: {(a - b).abs().max().item()}"


def _q3r_bad(g):
    p = _randn(g, 6, 4)
    t = lambda: [p.clone(), _randn(g, 6, 4), torch.zeros(6, 4), torch.zeros(6, 4)]  # noqa: E731
    kw = dict(step=1, lr=1e-3)
    A, B = _randn(g, 3, 2), _randn(g, 2, 4)
    return {
        "grad shape": lambda: ops.q3r_apply(p.clone(), _randn(g, 6, 5), torch.zeros(6, 4), torch.zeros(6, 4), **kw),
        "grad on meta": lambda: ops.q3r_apply(p.clone(), torch.empty(6, 4, device="meta"), torch.zeros(6, 4),
                                              torch.zeros(6, 4), **kw),
        "mixed dtypes": lambda: ops.q3r_apply(p.clone(), _randn(g, 6, 4).double(), torch.zeros(6, 4),
                                              torch.zeros(6, 4), **kw),
        "int grad": lambda: ops.q3r_apply(p.clone(), torch.ones(6, 4, dtype=torch.int32), torch.zeros(6, 4),
                                          torch.zeros(6, 4), **kw),
        "step 0": lambda: ops.q3r_apply(*t(), step=0, lr=1e-3),
        "step 1.5": lambda: ops.q3r_apply(*t(), step=1.5, lr=1e-3),
        "step True": lambda: ops.q3r_apply(*t(), step=True, lr=1e-3),
        "lr -1": lambda: ops.q3r_apply(*t(), step=1, lr=-1.0),
        "lr NaN": lambda: ops.q3r_apply(*t(), step=1, lr=math.nan),
        "lr str": lambda: ops.q3r_apply(*t(), step=1, lr="0.1"),
        "beta 1": lambda: ops.q3r_apply(*t(), betas=(1.0, 0.9), **kw),
        "one beta": lambda: ops.q3r_apply(*t(), betas=(0.9,), **kw),
        "eps inf": lambda: ops.q3r_apply(*t(), eps=math.inf, **kw),
        "weight_decay inf": lambda: ops.q3r_apply(*t(), weight_decay=math.inf, **kw),
        "lmbda NaN": lambda: ops.q3r_apply(*t(), lmbda=math.nan, **kw),
        "factor A rows": lambda: ops.q3r_apply(*t(), [(0, 2, A, B)], **kw),
        "factor B cols": lambda: ops.q3r_apply(*t(), [(0, 3, A, _randn(g, 2, 5))], **kw),
        "factor A without B": lambda: ops.q3r_apply(*t(), [(0, 3, A, None)], **kw),
        "factors overlap": lambda: ops.q3r_apply(*t(), [(0, 3, A, B), (2, 5, A, B)], **kw),
        "factor out of range": lambda: ops.q3r_apply(*t(), [(4, 7, A, B)], **kw),
        "factor on meta": lambda: ops.q3r_apply(*t(), [(0, 3, A.to("meta"), B)], **kw),
        "factors on a 1-D p": lambda: ops.q3r_apply(*(x.flatten() for x in t()), [(0, 3, A, B)], **kw),
    }


# ------------------------------------------------------------------------- LowRankLinear / LoRALinear
@FUZZ
@given(_lowrank_case())
def test_lowrank_linear_matches_fp64_formula(case):
    lead, n_in, n_out, r, dtype, has_bias, seed = case
    torch.manual_seed(seed)
    layer = lk_nn.LowRankLinear(n_in, n_out, r, bias=has_bias, dtype=dtype)
    x = _randn(_gen(seed), *lead, n_in, dtype=dtype)
    y = layer(x)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    U, V, b = layer.U.detach(), layer.V.detach(), None if layer.bias is None else layer.bias.detach()
    want = (x.double() @ V.double().T) @ U.double().T + (0 if b is None else b.double())
    _close(y, want, _matmul_bound(x, U, V, b, dtype), "LowRankLinear")


@FUZZ
@given(_lowrank_case(), st.floats(0.5, 32))
def test_lora_linear_matches_fp64_formula(case, alpha):
    lead, n_in, n_out, r, dtype, has_bias, seed = case
    torch.manual_seed(seed)
    base = torch.nn.Linear(n_in, n_out, bias=has_bias, dtype=dtype)
    layer = lk_nn.LoRALinear(base, r, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = _randn(_gen(seed), *lead, n_in, dtype=dtype)
    y = layer(x)
    assert y.shape == (*lead, n_out) and y.dtype == dtype
    W, A, B = base.weight.detach().double(), layer.lora_A.detach().double(), layer.lora_B.detach().double()
    x64 = x.double()
    want = x64 @ W.T + layer.scaling * (x64 @ A.T) @ B.T + (0 if base.bias is None else base.bias.detach().double())
    bound = (2 * _matmul_bound(x, layer.lora_B, layer.lora_A, None, dtype) * (layer.scaling + 1)
             + 2 * (n_in + 4) * EPS[dtype] * (x64.abs() @ W.abs().T + (0 if base.bias is None else
                                                                          base.bias.detach().double().abs())))
    _close(y, want, bound, "LoRALinear")


def _modules_bad(g):
    lin = torch.nn.Linear(5, 4)
    low = lk_nn.LowRankLinear(5, 4, 2)
    lora = lk_nn.LoRALinear(torch.nn.Linear(5, 4), 2, 4.0)
    return {
        "LowRankLinear rank 0": lambda: lk_nn.LowRankLinear(5, 4, 0),
        "LowRankLinear rank -2": lambda: lk_nn.LowRankLinear(5, 4, -2),
        "LowRankLinear rank 2.0": lambda: lk_nn.LowRankLinear(5, 4, 2.0),
        "LowRankLinear rank True": lambda: lk_nn.LowRankLinear(5, 4, True),
        "LowRankLinear in_features 0": lambda: lk_nn.LowRankLinear(0, 4, 2),
        "LowRankLinear out_features '4'": lambda: lk_nn.LowRankLinear(5, "4", 2),
        "LowRankLinear x features": lambda: low(_randn(g, 3, 6)),
        "LowRankLinear x int": lambda: low(torch.ones(3, 5, dtype=torch.long)),
        "LowRankLinear x fp64": lambda: low(_randn(g, 3, 5).double()),
        "LowRankLinear x on meta": lambda: low(torch.empty(3, 5, device="meta")),
        "LowRankLinear x expanded": lambda: low(torch.randn(1, 5).expand(2**40, 5)),
        "LoRALinear base not Linear": lambda: lk_nn.LoRALinear(torch.nn.ReLU(), 2, 4.0),
        "LoRALinear r 0": lambda: lk_nn.LoRALinear(lin, 0, 4.0),
        "LoRALinear r -1": lambda: lk_nn.LoRALinear(lin, -1, 4.0),
        "LoRALinear r 1.5": lambda: lk_nn.LoRALinear(lin, 1.5, 4.0),
        "LoRALinear alpha NaN": lambda: lk_nn.LoRALinear(lin, 2, math.nan),
        "LoRALinear alpha inf": lambda: lk_nn.LoRALinear(lin, 2, math.inf),
        "LoRALinear alpha str": lambda: lk_nn.LoRALinear(lin, 2, "4"),
        "LoRALinear dropout 1": lambda: lk_nn.LoRALinear(lin, 2, 4.0, dropout=1.0),
        "LoRALinear dropout NaN": lambda: lk_nn.LoRALinear(lin, 2, 4.0, dropout=math.nan),
        "LoRALinear x features": lambda: lora(_randn(g, 3, 6)),
        "LoRALinear x int": lambda: lora(torch.ones(3, 5, dtype=torch.long)),
        "LoRALinear x fp64": lambda: lora(_randn(g, 3, 5).double()),
        "LoRALinear x on meta": lambda: lora(torch.empty(3, 5, device="meta")),
        "LoRALinear x expanded": lambda: lora(torch.randn(1, 5).expand(2**40, 5)),
    }


# ------------------------------------------------------------------------------- invalid, every op
_BAD = {"lowrank_matmul": _lowrank_bad, "lora_matmul": _lora_bad, "spectral": _spectral_bad,
        "factored": _factored_bad,
        "truncated_svd": _svd_bad, "pad_slices": _pad_bad, "q3r_apply": _q3r_bad, "modules": _modules_bad}


@pytest.mark.parametrize("op", sorted(_BAD))
def test_invalid_inputs_raise_value_or_type_error(op):
    """Every broken call of every public op and module: ValueError or TypeError, the bad value named."""
    cases = _BAD[op](_gen(0))
    assert len(cases) >= 8
    for label, call in cases.items():
        exc = _raises_cleanly(call, f"{op}: {label}")
        assert str(exc), f"{op}: {label}: empty message"


@FUZZ
@given(st.sampled_from(sorted(_BAD)), st.data())
def test_invalid_inputs_fuzzed(op, data):
    """The same broken calls drawn with random data in the valid arguments."""
    cases = _BAD[op](_gen(data.draw(st.integers(0, 2**16))))
    label = data.draw(st.sampled_from(sorted(cases)))
    _raises_cleanly(cases[label], f"{op}: {label}")


# ------------------------------------------------------------------------------- the compiled op
_CRASH_PROBE = r"""
import sys, torch, lowrank_kernels
from lowrank_kernels import ops
pad, gather = torch.ops.lowrank_kernels.pad_slices, torch.ops.lowrank_kernels.gather_slices
one = torch.ones(4, 2)
calls = [
    lambda: pad([], [], [], 4, 0),
    lambda: pad([one], [], [], 4, 0),
    lambda: pad([one], [0], [4], 0, 0),
    lambda: pad([one], [0], [4], -5, 0),
    lambda: pad([one], [0], [4], 2**62, 0),
    lambda: pad([one], [0], [4], 4, -1),
    lambda: pad([one], [0], [4], 4, 2),
    lambda: pad([one], [0], [4], 4, 2**40),
    lambda: pad([one], [-4], [0], 4, 0),
    lambda: pad([one], [2**62], [2**62 + 4], 2**62 + 8, 0),
    lambda: pad([one], [-(2**62)], [4], 4, 0),
    lambda: pad([one], [0], [5], 4, 0),
    lambda: pad([one], [1], [5], 4, 0),
    lambda: pad([one, one], [0, 0], [4, 4], 8, 0),
    lambda: pad([one, one], [0, 3], [4, 7], 8, 0),
    lambda: pad([one], [0, 4], [4, 8], 8, 0),
    lambda: pad([one, one], [0], [4], 8, 0),
    lambda: pad([torch.tensor(1.0)], [0], [1], 1, 0),
    lambda: pad([one, torch.ones(4, 3)], [0, 4], [4, 8], 8, 0),
    lambda: pad([one, torch.ones(4, 2, 1)], [0, 4], [4, 8], 8, 0),
    lambda: pad([one, one.double()], [0, 4], [4, 8], 8, 0),
    lambda: pad([one, one.to("meta")], [0, 4], [4, 8], 8, 0),
    lambda: pad([one, one], [4, 0], [8, 5], 8, 0),
    lambda: pad([torch.ones(1, 1).expand(1, 2**31)], [0], [1], 2**10, 0),
    lambda: pad([torch.ones(0, 2)], [0], [1], 4, 0),
    lambda: pad([torch.ones(1, 0)], [0], [1], 2**40, 0),
    lambda: pad([one.t()], [0], [4], 4, 0),
    lambda: pad([one[:, :1].expand(4, 2**40)], [0], [4], 8, 0),
    lambda: pad(one, [0], [4], 8, 0),
    lambda: pad([one], [0.5], [4], 8, 0),
    lambda: pad([one], [0], [4], 8.0, 0),
    lambda: pad([one], [0], [4], 8, None),
    lambda: pad([None], [0], [4], 8, 0),
    lambda: pad([one], "0", [4], 8, 0),
    lambda: gather(one, [], [], 0),
    lambda: gather(one, [0], [5], 0),
    lambda: gather(one, [-1], [2], 0),
    lambda: gather(one, [3], [1], 0),
    lambda: gather(one, [0, 1], [2, 3], 0),
    lambda: gather(one, [0], [2, 3], 0),
    lambda: gather(one, [0], [2], 2),
    lambda: gather(one, [0], [2], -3),
    lambda: gather(torch.tensor(1.0), [0], [1], 0),
    lambda: gather(one, [0], [2**62], 0),
    lambda: gather(one, [2**63 - 1], [2**63 - 1], 0),
    lambda: gather(None, [0], [1], 0),
    lambda: gather([one], [0], [1], 0),
    lambda: gather(one, [0], [1], 0.0),
    lambda: ops.pad_slices([one], [(0, 4)], 2**62),
    lambda: ops.gather_slices(one, [(0, 2**62)]),
    lambda: ops.pad_slices([one], [(0, 2**63)], 8),
]
ok = (RuntimeError, ValueError, TypeError, IndexError)
for i, call in enumerate(calls):
    try:
        call()
    except ok as exc:
        print(f"{i} {type(exc).__name__}")
    except BaseException as exc:
        print(f"{i} UNEXPECTED {type(exc).__name__}: {exc}")
        sys.exit(3)
    else:
        print(f"{i} ACCEPTED")
        sys.exit(4)
print("done", len(calls))
"""


def test_compiled_op_never_crashes_on_bad_arguments():
    """~50 bad calls straight into ``torch.ops.lowrank_kernels`` (and through ``ops``) in a child process:
    every one raises a Python exception of an expected type; the process exits 0 (no abort, no segfault,
    no attempt to allocate terabytes)."""
    res = subprocess.run([sys.executable, "-c", _CRASH_PROBE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"exit code {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    lines = res.stdout.strip().splitlines()
    assert lines[-1].startswith("done") and int(lines[-1].split()[1]) == len(lines) - 1 >= 50


# -------------------------------------------------------------------------------------- app config
_INT_KEYS = [f.name for f in __import__("dataclasses").fields(TrainConfig) if field_type(f.name) is int]
_FLOAT_KEYS = [f.name for f in __import__("dataclasses").fields(TrainConfig) if field_type(f.name) is float]


@FUZZ
@given(st.sampled_from(_INT_KEYS), st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (math.isfinite(v) and v.is_integer())),
    st.booleans(), st.sampled_from(["3.5", "nan", "inf", "", "ten", "1e3"]), st.lists(st.integers(), max_size=2)))
def test_config_integer_keys_refuse_non_integers(key, value):
    """``steps: 3.5`` (and NaN, inf, True, "3.5") is refused naming the key, never rounded."""
    with pytest.raises(ConfigError, match=repr(key)):
        from_dict({key: value})


@FUZZ
@given(st.sampled_from(_INT_KEYS), st.integers(0, 10**6), st.booleans())
def test_config_integers_stay_integers(key, value, as_float):
    try:
        cfg = from_dict({key: float(value) if as_float else value})
    except ConfigError as exc:  # a value check (e.g. dim % heads), not a type refusal
        assert "must be an integer" not in str(exc)
        return
    assert type(getattr(cfg, key)) is int and getattr(cfg, key) == value


@FUZZ
@given(st.sampled_from(_FLOAT_KEYS), st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf"]),
                                               st.booleans()))
def test_config_float_keys_refuse_non_finite_and_bool(key, value):
    with pytest.raises(ConfigError, match=repr(key)):
        from_dict({key: value})


@pytest.mark.parametrize("kw", [dict(steps=3.5), dict(steps=True), dict(lr=math.nan), dict(target_rank=math.inf),
                                dict(dim="64"), dict(progress=1)])
def test_config_types_checked_at_construction(kw):
    with pytest.raises(ConfigError, match=repr(next(iter(kw)))):
        TrainConfig(**kw)
