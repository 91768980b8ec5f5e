"""Test helpers shared by ``python_tests`` and ``bench`` (importable by users' own tests too)."""

from __future__ import annotations

import torch


def assert_verbose_allclose(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-8,
                            max_print: int = 5, name: str = "tensor") -> None:
    """Like ``torch.testing.assert_close`` but prints how many elements differ and where.

    Compares in fp64; NaN never equals anything (a NaN where a number was expected fails).
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    diff = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(diff <= tol)  # NaN compares False, so it is counted as bad
    n_bad = int(bad.sum())
    if n_bad:
        idx = bad.nonzero()[:max_print].tolist()
        lines = [f"  at {tuple(i)}: actual={a[tuple(i)].item():.6g} expected={e[tuple(i)].item():.6g}" for i in idx]
        worst = float(torch.nan_to_num(diff, nan=float("inf")).max())
        raise AssertionError(
            f"{name}: {n_bad}/{a.numel()} elements differ (rtol={rtol}, atol={atol}, max abs diff={worst:.3g})\n"
            + "\n".join(lines)
        )


def max_abs_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.detach().double() - expected.detach().double()).abs().max()) if actual.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref_fp64: torch.Tensor, same_precision: torch.Tensor,
                              name: str = "tensor", factor: float = 2.0, atol: float = 1e-5) -> None:
    """flash-attention's honest low-precision tolerance.

    ``out`` (the kernel) must be no further from ``ref_fp64`` (the reference computed in fp64)
    than ``factor`` times the error of ``same_precision`` (the PyTorch reference run in the
    kernel's own dtype), plus ``atol``.
    """
    err = max_abs_err(out, ref_fp64)
    base = max_abs_err(same_precision, ref_fp64)
    bound = factor * base + atol
    if not err <= bound:
        raise AssertionError(f"{name}: max error {err:.3g} > {factor} x torch error {base:.3g} + {atol:g}")
