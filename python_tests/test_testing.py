"""The GPU-cost counter of ``lowrank_kernels.testing`` counts what it claims, and nothing else."""

import pytest
import torch

from lowrank_kernels.testing import count_gpu_cost


def test_a_matmul_is_one_launch_and_no_sync():
    a, b = torch.randn(8, 4), torch.randn(4, 3)
    with count_gpu_cost() as cost:
        a @ b
    assert cost.launches == 1 and cost.syncs == 0
    assert sum(cost.ops.values()) == 1


def test_views_metadata_and_allocations_are_not_launches():
    x = torch.randn(6, 4)
    with count_gpu_cost() as cost:
        x.t()
        x.view(24)
        x[1:3]
        x.unsqueeze(0).expand(2, 6, 4)
        torch.empty(5, 5)
        torch.empty_like(x)
        _ = x.shape
    assert cost.launches == 0 and cost.syncs == 0


@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(), lambda t: t.tolist(), lambda t: bool(t.sum() > 0), lambda t: float(t.sum()),
    lambda t: int(t.sum()), lambda t: t.cpu(), lambda t: t.numpy(),
])
def test_each_host_read_is_one_sync(read):
    t = torch.arange(4.0)
    with count_gpu_cost() as cost:
        read(t)
    assert cost.syncs == 1, cost


def test_data_dependent_shapes_and_linalg_error_checks_sync():
    t = torch.tensor([0.0, 1.0, 0.0, 2.0])
    spd = torch.eye(3) * 2
    with count_gpu_cost() as cost:
        t.nonzero()
    assert cost.syncs == 1 and cost.launches == 1
    for linalg in (torch.linalg.eigh, torch.linalg.svd, torch.linalg.cholesky):
        with count_gpu_cost() as cost:
            linalg(spd)
        assert (cost.launches, cost.syncs) == (1, 1), linalg
    with count_gpu_cost() as cost:
        torch.linalg.cholesky_ex(spd)  # the _ex form leaves the check to the caller: no sync
    assert (cost.launches, cost.syncs) == (1, 0)


def test_backward_ops_are_counted():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(5, 4)
    with count_gpu_cost() as fwd:
        y = (x @ w).sum()
    with count_gpu_cost() as both:
        (x @ w).sum().backward()
    assert both.launches > fwd.launches and both.syncs == 0
    assert y.requires_grad


def test_large_tensors_created_are_listed_but_not_in_place_writes_or_views():
    x = torch.randn(64, 32)
    with count_gpu_cost(min_numel=64 * 32) as cost:
        y = x * 2          # new (64, 32): listed
        y.mul_(3)          # in place: not listed
        y.t()              # view: not listed
        x.sum(0)           # small: not listed
    assert cost.large == [("mul", (64, 32))]


def test_the_counter_is_gone_after_the_block():
    x = torch.randn(3)
    with count_gpu_cost() as cost:
        x + 1
    x.sum().item()
    assert (cost.launches, cost.syncs) == (1, 0)


def test_triton_launches_are_counted(triton_backend):
    from lowrank_kernels import ops

    x, U, V = torch.randn(16, 8), torch.randn(8, 4), torch.randn(4, 8)
    with count_gpu_cost() as cost:
        ops.lowrank_matmul(x, U, V)
    # the kernel is the whole cost of a forward call: the custom op around it is not counted again
    assert cost.triton_launches == 1 and cost.launches == 1, cost
