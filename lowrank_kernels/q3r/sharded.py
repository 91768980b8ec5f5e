"""Q3R on weights sharded by rows (FSDP2's ``fully_shard``: ``DTensor`` parameters with ``Shard(0)``).

A weight ``X (M, n)`` is held as ``X = [X_1; ...; X_p]``: process ``i`` has the rows ``X_i`` (its local tensor,
``DTensor.to_local()``), starting at global row ``o_i``. An operator covers rows ``[s, e)`` of ``X`` (all of them,
or one slice of a fused QKV weight); its local part is the intersection of ``[s, e)`` with the shard, which may
be empty, and a slice may straddle a shard boundary. Nothing here gathers a whole weight; the maths is that of
:mod:`lowrank_kernels.q3r.regularizer` (see its docstring), with ``U`` held by rows like ``X``:

* **Rebuild** (:func:`refresh_ops`). ``sigma``, ``V (n, k)`` (and the warm-start basis) end up on every process,
  ``U`` only as the local rows ``U_i = X_i V diag(1 / sigma)`` (up to the Rayleigh-Ritz rotation below).

  - Randomized (warm or cold sketch, the path :func:`ops.truncated_svd` takes for these shapes): the same
    seeded sketch ``Omega (n, l)`` as one process (first columns the previous right vectors on a warm
    rebuild); ``Y_i = X_i Omega`` is local, its columns are orthonormalised by a distributed CholeskyQR2 (two
    all-reduces of the ``(l, l)`` Gram ``sum_i Y_i^T Y_i``, fp64); each subspace iteration all-reduces
    ``Z = sum_i X_i^T Q_i (n, l)``; Rayleigh-Ritz all-reduces ``B = sum_i Q_i^T X_i (l, n)`` and takes the SVD
    of that small matrix on every process: ``B = W S V^T``, ``U_i = Q_i W``.
  - Exact (an operator's first rebuild with ``warm_start``, and shapes that :func:`ops.truncated_svd` answers
    with the full SVD): when the operator has at most ``n`` rows they are all-gathered (one ``all_gather`` per
    dtype for all such operators) and every process takes the same full SVD as one process would; a taller
    one all-reduces its Gram ``X^T X = sum_i X_i^T X_i (n, n)`` (fp64) and takes ``eigh``:
    ``sigma = sqrt(lambda)``, ``U_i = X_i V / sigma``. Either moves about ``min(m, n) n`` numbers, no more
    than gathering the operator's rows, once per operator.

  Every all-reduce carries all operators of the rebuild that are in the same phase (one flat buffer per
  dtype). The kept count, eps and the widening decisions come from the all-reduced (hence identical) sigmas,
  so every process takes the same decisions (checked by one tiny broadcast per rebuild, :func:`_agree`).

  - Gathered (:data:`REBUILD` ``"auto"`` picks it per operator when it moves fewer bytes, :func:`_gathers`):
    the operator's rows are all-gathered and ``Q3R._refresh_ops`` itself rebuilds it on every process, exactly
    as one process would; each keeps its rows of ``U``. With thin sketches (``l`` small against ``m``) the maths
    on the shards moves less; near ``l ~ m / 3`` and beyond, or when the Ritz check keeps asking for
    refinement, gathering does (bench/q3r_fsdp.py files both).

* **Step** (:func:`decoupled_step_`). ``G(X) = 2 lmbda L X R`` on the local rows, with
  ``L X R - X = U D P + (Q + U D C) D V^T``, ``P = U^T X = sum_i U_i^T X_i (k, n)``, ``Q_i = X_i V`` (local),
  ``C = P V``. The ``P`` of every sharded operator are formed at the old weights and summed in ONE flat
  all-reduce per optimizer step (the first sharded :func:`decoupled_step_` of a step does it for all weights),
  i.e. ``sum_ops k n`` numbers per step against ``M n`` per weight to gather the weights.

* **State** (:func:`gathered_U`, :func:`local_rows`): :meth:`Q3R.state_dict` holds the whole ``U (m, k)`` of
  every operator (one flat all-reduce of the zero-padded rows; a collective: call it on every process), so a
  state saved under FSDP2 is the single-process state and loads into either.

Usage: apply ``fully_shard`` first, then build ``AdamQ3R`` (or ``Q3R``) on the sharded model, as any optimizer
(its operators hold the ``DTensor`` parameters), and call ``step`` on every process. Checkpoints: the model
through ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` (full or sharded), the optimizer as
each process's ``AdamQ3R.state_dict()`` (``DTensor`` moments and the whole Q3R operators; ``torch.save`` /
``torch.load(weights_only=True)`` round-trip it). ``get_optimizer_state_dict`` of torch drops the ``"q3r"``
entry, so it cannot carry AdamQ3R's state.

Limits: the shard dimension must be 0 (``fully_shard``'s default) over one mesh dimension (other mesh
dimensions may replicate, as in HSDP; a wholly replicated ``DTensor`` is refused), split as ``torch.chunk``
splits it; Conv1D-style ``(in, out)`` weights are refused (their shards split the operator's columns);
``Q3R.val``, ``Q3R.grad`` and ``Q3R.factors`` (which assemble whole weights) refuse sharded weights with a
``TypeError``; ``AdamQ3R`` needs none of them. Non-finite checks of sharded tensors are agreed over the
processes (:func:`finite_flags`; DTensor's own found-inf op already agrees on the device path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import distributed as _dist
from .operator import _EXACT_COLD_DIM, _K_ROUND, _KEEP_ULPS, _REFINE_ROUNDS, _SKETCH_CACHE_ELEMENTS, _WIDEN_MARGIN

try:  # torch built without distributed: nothing is ever sharded
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = None

# Smallest Cholesky pivot of the distributed CholeskyQR2 (fp64 Gram), relative to the largest, that is trusted;
# below it (nearly dependent sketch columns) the operator is rebuilt by the exact path instead.
_CHOL_MIN_PIVOT = 1e-7
# How each sharded operator is rebuilt: "auto" picks per operator whichever moves fewer bytes (see
# :func:`_gathers`), "sharded" always the maths on the shards, "gather" always the gathered rows.
REBUILD = "auto"


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor`` (a weight this module handles)."""
    return DTensor is not None and isinstance(t, DTensor)


class _Shard:
    """Where one operator's rows lie in this process's shard of its weight.

    ``local (a, b)``: rows of the local tensor; ``within (a', b')``: the same rows counted from the operator's
    first row; ``group``: the process group over which the weight's rows are split.
    """

    __slots__ = ("group", "local", "within", "offset", "nrows")

    def __init__(self, group, local, within, offset, nrows):
        self.group, self.local, self.within, self.offset, self.nrows = group, local, within, offset, nrows


def weight_shard(w) -> tuple:
    """``(group, offset, nrows)`` of a row-sharded ``DTensor`` weight: the process group over which dim 0 is
    split, the global index of this process's first row and its number of rows.

    Raises ``TypeError`` for a placement other than ``Shard(0)`` over one mesh dimension (plus ``Replicate``).
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = w.device_mesh, tuple(w.placements)
    dims = [i for i, pl in enumerate(placements) if isinstance(pl, Shard)]
    bad = [pl for pl in placements if not isinstance(pl, (Shard, Replicate))]
    if bad or len(dims) > 1 or any(placements[i].dim != 0 for i in dims):
        raise TypeError(f"Q3R supports weights sharded by rows (Shard(0) on one mesh dimension, as fully_shard "
                        f"does), got placements {placements} for a weight of shape {tuple(w.shape)}")
    if not dims:
        raise TypeError(f"Q3R supports weights sharded by rows (Shard(0)); a DTensor weight of shape "
                        f"{tuple(w.shape)} with placements {placements} is not sharded")
    shape, offset = compute_local_shape_and_global_offset(w.shape, mesh, placements)
    return mesh.get_group(dims[0]), int(offset[0]), int(shape[0])


def shard_of(op) -> _Shard:
    """The :class:`_Shard` of a Q3R operator on a sharded weight (computed once, kept on the operator)."""
    sh = getattr(op, "_shard", None)
    if sh is None:
        if getattr(op, "transposed", False):
            raise TypeError(f"Q3R {op.name}: a Conv1D-style (in, out) weight sharded by FSDP2 splits the operator's "
                            "columns, not its rows; only nn.Linear-style (out, in) weights are supported sharded")
        group, offset, nrows = weight_shard(op.weight)
        s, e = op.rows if op.rows is not None else (0, op.weight.shape[0])
        a, b = max(s, offset), min(e, offset + nrows)
        b = max(a, b)
        sh = op._shard = _Shard(group, (a - offset, b - offset), (a - s, b - s), offset, nrows)
    return sh


def local_view(op, w: torch.Tensor | None = None) -> torch.Tensor:
    """The operator's rows of this process's shard, ``(m_i, n)``, a view of the local tensor (maybe 0 rows)."""
    a, b = shard_of(op).local
    return (op.weight if w is None else w).to_local()[a:b]


def _groups(items: Sequence) -> list[tuple[object, list]]:
    """``items`` (whose first field is an operator) by process group, in first-seen order (same on every process)."""
    out: dict[int, tuple[object, list]] = {}
    for item in items:
        g = shard_of(item[0] if isinstance(item, tuple) else item).group
        out.setdefault(id(g), (g, []))[1].append(item)
    return list(out.values())


def finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per tensor, whether every element is finite on EVERY process, for a list that may hold ``DTensor``s.

    Local tensors of ``DTensor``s are checked locally and the flags combined by one all-reduce (MIN) over the
    default group when any tensor is sharded, so that every process skips (or raises for) the same step.
    """
    from .._checks import finite_flags as _local_flags

    local = [t.to_local() if is_sharded(t) else t for t in tensors]
    flags = _local_flags(local)
    if any(is_sharded(t) for t in tensors) and _dist.is_distributed():
        f = torch.tensor([1.0 if x else 0.0 for x in flags], dtype=torch.float64)
        if local:
            f = f.to(local[0].device)
        _dist.flat_all_reduce([f], op=torch.distributed.ReduceOp.MIN)
        flags = [bool(x) for x in f.cpu().tolist()]
    return flags


# ------------------------------------------------------------------------------------------------ rebuild
class _Job:
    """One operator's rebuild in flight: ``X`` its local rows (compute dtype), ``k`` the triplets asked for,
    ``mode`` how (``"exact"``, ``"sketch"``, ``"warm"``), ``basis`` the warm start (``(k_b, n)`` or None)."""

    def __init__(self, i, op, X, k, mode, basis=None):
        self.i, self.op, self.X, self.k, self.mode, self.basis = i, op, X, k, mode, basis
        self.Q = self.U = self.S = self.Vh = None
        self.host_s = self.host_res = None


def _sketch_of(q3r, job: _Job, width: int) -> torch.Tensor:
    """The ``(n, width)`` starting block one process uses for this operator (``operator._sketched_svd``): the
    operator's seeded Gaussian block, its first columns replaced by ``job.basis`` on a warm start."""
    from .operator import _seeded_sketch

    op = job.op
    sketch = _seeded_sketch([q3r._seed(job.i)], op.n, width, job.X.dtype, job.X.device, q3r._sketches,
                            _SKETCH_CACHE_ELEMENTS)[0]
    if job.mode == "warm" and job.basis is not None:
        sketch = sketch.clone()
        c = min(job.basis.shape[0], width)
        sketch[:, :c] = job.basis[:c].T
    return sketch


def _dist_orth(Ys: list[torch.Tensor], group) -> tuple[list[torch.Tensor], list[bool]]:
    """CholeskyQR2 of the row-sharded ``Ys`` (``(m_i, l)`` each): two flat all-reduces of the fp64 Grams.
    Returns the orthonormal local rows and, per matrix, whether both factorisations were trusted (the same on
    every process: the Grams are all-reduced)."""
    ok = [True] * len(Ys)
    Ys = list(Ys)
    for _ in range(2):
        grams = [Y.to(torch.float64).T @ Y.to(torch.float64) for Y in Ys]
        _dist.flat_all_reduce(grams, group=group)
        factors = [torch.linalg.cholesky_ex(G) for G in grams]
        if not factors:
            break
        # one host read for every matrix: factorised, and the smallest pivot resolved against the largest
        flags = torch.stack([(info == 0) & (L.diagonal().amin() > _CHOL_MIN_PIVOT * L.diagonal().amax())
                             for L, info in factors]).tolist()
        for j, (Y, (L, _), flag) in enumerate(zip(Ys, factors, flags, strict=True)):
            if not flag:
                ok[j] = False
                continue
            eye = torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
            Ys[j] = Y @ torch.linalg.solve_triangular(L.T, eye, upper=True).to(Y.dtype)
    return Ys, ok


def _randomized(q3r, jobs: list[_Job], n_iter: int, group) -> list[_Job]:
    """Sketch, ``n_iter`` subspace iterations and Rayleigh-Ritz for ``jobs`` (as ``ops.truncated_svd``);
    returns the jobs whose orthonormalisation was not trusted (to be rebuilt exactly)."""
    from ..ops.truncated_svd import sketch_width

    Ys = [job.X @ _sketch_of(q3r, job, sketch_width((job.op.m, job.op.n), job.k, q3r.oversample)) for job in jobs]
    Qs, ok = _dist_orth(Ys, group)
    for _ in range(n_iter):
        Zs = [job.X.T @ Q for job, Q in zip(jobs, Qs, strict=True)]  # (n, l) partial sums
        _dist.flat_all_reduce(Zs, group=group)
        Qs, ok2 = _dist_orth([job.X @ torch.linalg.qr(Z).Q for job, Z in zip(jobs, Zs, strict=True)], group)
        ok = [a and b for a, b in zip(ok, ok2, strict=True)]
    good = [(job, Q) for job, Q, flag in zip(jobs, Qs, ok, strict=True) if flag]
    Bs = [Q.T @ job.X for job, Q in good]  # (l, n) partial sums
    _dist.flat_all_reduce(Bs, group=group)
    for (job, Q), B in zip(good, Bs, strict=True):
        W, S, Vh = torch.linalg.svd(B, full_matrices=False)
        job.U, job.S, job.Vh = Q @ W[:, :job.k], S[:job.k], Vh[:job.k]
    return [job for job, flag in zip(jobs, ok, strict=True) if not flag]


def _layout(op) -> list[tuple[int, int]]:
    """``(offset, nrows)`` of every process's shard of ``op``'s weight, in group-rank order (``fully_shard``'s
    ``torch.chunk`` split: ``ceil(M / p)`` rows each, the last ones fewer or none); checked against this
    process's own shard."""
    sh = shard_of(op)
    M, p = op.weight.shape[0], _dist.world_size(sh.group)
    c = -(-M // p)
    out = [(min(r * c, M), max(0, min(c, M - r * c))) for r in range(p)]
    if out[_dist.rank(sh.group)] != (sh.offset, sh.nrows):
        raise TypeError(f"Q3R {op.name}: the weight's shard (offset {sh.offset}, {sh.nrows} rows) is not "
                        f"torch.chunk's split of {M} rows over {p} processes")
    return out


def _gather_rows(jobs: list[_Job], group) -> list[torch.Tensor]:
    """Each job's whole ``(m, n)`` operator rows on every process: one ``all_gather`` per dtype of every process's
    rows of all the jobs, one flat buffer per process padded to the largest (the shards hold about equal row
    counts, so the padding is small whatever the slices)."""
    import torch.distributed as tdist

    out: list[torch.Tensor | None] = [None] * len(jobs)
    by_dtype: dict = {}
    for j, job in enumerate(jobs):
        by_dtype.setdefault((job.X.dtype, job.X.device), []).append(j)
    world = _dist.world_size(group)
    for (dtype, device), idx in by_dtype.items():
        spans = {}  # j -> [(a, b) rows of the operator held by process r, for each r]
        for j in idx:
            op = jobs[j].op
            s, e = op.rows if op.rows is not None else (0, op.weight.shape[0])
            spans[j] = [(max(s, o) - s, max(max(s, o), min(e, o + n)) - s) for o, n in _layout(op)]
        totals = [sum((spans[j][r][1] - spans[j][r][0]) * jobs[j].op.n for j in idx) for r in range(world)]
        send = torch.zeros(max(totals), dtype=dtype, device=device)
        parts = [jobs[j].X.reshape(-1) for j in idx]
        if parts:
            mine = torch.cat(parts)
            send[:mine.numel()] = mine
        recv = [torch.empty_like(send) for _ in range(world)]
        tdist.all_gather(recv, send, group=group)
        fulls = {j: torch.empty(jobs[j].op.m, jobs[j].op.n, dtype=dtype, device=device) for j in idx}
        for r, buf in enumerate(recv):
            pos = 0
            for j in idx:
                (a, b), n = spans[j][r], jobs[j].op.n
                fulls[j][a:b] = buf[pos:pos + (b - a) * n].view(b - a, n)
                pos += (b - a) * n
        for j in idx:
            out[j] = fulls[j]
    return out


def _exact(jobs: list[_Job], group) -> None:
    """Top-``k`` triplets from the operator's gathered rows (``m <= n``) or its all-reduced Gram (``m > n``)."""
    rows = [job for job in jobs if job.op.m <= job.op.n]
    tall = [job for job in jobs if job.op.m > job.op.n]
    grams = [job.X.to(torch.float64).T @ job.X.to(torch.float64) for job in tall]
    _dist.flat_all_reduce(grams, group=group)
    for job, full in zip(rows, _gather_rows(rows, group) if rows else [], strict=True):
        U, S, Vh = torch.linalg.svd(full, full_matrices=False)
        a, b = shard_of(job.op).within
        job.U, job.S, job.Vh = U[a:b, :job.k].clone(), S[:job.k].clone(), Vh[:job.k].clone()
    for job, G in zip(tall, grams, strict=True):
        ev, V = torch.linalg.eigh(G)
        ev, V = ev.flip(0)[:job.k], V.flip(1)[:, :job.k].to(job.X.dtype)
        job.S, job.Vh = ev.clamp_min(0).sqrt().to(job.X.dtype), V.T.contiguous()
        job.U = (job.X @ V) / job.S.clamp_min(torch.finfo(job.X.dtype).tiny)


def _randomized_path(q3r, job: _Job) -> bool:
    from ..ops.truncated_svd import svd_path

    return job.mode != "exact" and svd_path((job.op.m, job.op.n), job.k, q3r.oversample) == "randomized"


def _svds(q3r, jobs: list[_Job], group, n_iter: int | None = None) -> None:
    """Fill ``U`` (local rows), ``S``, ``Vh`` of every job, in lockstep over the processes of ``group``
    (``n_iter``: the subspace iterations of every randomized job; default 0 warm, ``q3r.n_iter`` cold)."""
    exact, by_iter = [], {}
    for job in jobs:
        if _randomized_path(q3r, job):
            it = n_iter if n_iter is not None else (0 if job.mode == "warm" else q3r.n_iter)
            by_iter.setdefault(it, []).append(job)
        else:
            exact.append(job)
    for it in sorted(by_iter):
        exact += _randomized(q3r, by_iter[it], it, group)
    if exact:
        _exact(exact, group)


def _read_back(jobs: list[_Job], group, residuals: bool) -> None:
    """Host copies of the jobs' sigmas and, with ``residuals``, of their Ritz residuals ``||X v_i - s_i u_i||``
    (squared norms of the local rows summed by one flat all-reduce)."""
    res = []
    if residuals:
        res = [(job.X @ job.Vh.T - job.U * job.S).square().sum(0) for job in jobs]
        _dist.flat_all_reduce(res, group=group)
    if not jobs:
        return
    flat = torch.cat([t.to(torch.float64).reshape(-1) for job in jobs for t in [job.S]]
                     + [r.sqrt().to(torch.float64) for r in res]).tolist()  # the one host read
    pos = 0
    for job in jobs:
        job.host_s, pos = flat[pos:pos + job.S.numel()], pos + job.S.numel()
    for job in jobs if residuals else []:
        job.host_res, pos = flat[pos:pos + job.S.numel()], pos + job.S.numel()
    if not residuals:
        for job in jobs:
            job.host_res = None


def _check_and_refine(q3r, jobs: list[_Job], group) -> None:
    """``Q3R._refine`` for sharded jobs: the randomized rebuilds whose Ritz residuals fail ``Q3R._failing`` get
    ``_REFINE_ROUNDS`` rounds of ``max(1, n_iter)`` subspace iterations from their own right vectors, then the
    exact SVD where ``min(m, n) <= _EXACT_COLD_DIM`` (a ``RuntimeWarning`` for those left as they are)."""
    import warnings


    tol = getattr(q3r, "rebuild_tol", None)
    checked = [job for job in jobs if tol is not None and hasattr(q3r, "_failing") and _randomized_path(q3r, job)]
    _read_back([job for job in jobs if job not in checked], group, False)
    _read_back(checked, group, True)
    failed = [job for job in checked if q3r._failing(job.op, job.host_s, job.host_res)]
    for job in checked:
        job.op._sharded_refined = job in failed  # read by _gathers at the next rebuild
    stats = q3r.__dict__.setdefault("sharded_rebuild", {})
    stats.update(checked=len(checked), refined=len(failed), exact=0)
    for _ in range(_REFINE_ROUNDS):
        if not failed:
            return
        for job in failed:
            job.mode, job.basis = "warm", job.Vh
        _svds(q3r, failed, group, n_iter=max(1, q3r.n_iter))
        _read_back(failed, group, True)
        failed = [job for job in failed if q3r._failing(job.op, job.host_s, job.host_res)]
    exact = [job for job in failed if min(job.op.m, job.op.n) <= _EXACT_COLD_DIM]
    late = [job.op.name for job in failed if min(job.op.m, job.op.n) > _EXACT_COLD_DIM]
    if late:
        warnings.warn(f"Q3R: the rebuilt triplets of {late} still have Ritz residuals above rebuild_tol={tol}; "
                      "kept as they are", RuntimeWarning, stacklevel=4)
    for job in exact:
        job.mode = "exact"
    stats["exact"] = len(exact)
    if exact:
        _exact(exact, group)
        _read_back(exact, group, False)


def _move_eps(q3r, op, sigma: float) -> None:
    out = q3r._next_eps(op, sigma)
    if isinstance(out, tuple):  # (eps, eps0): the schedule stores nothing itself
        op.eps, op.eps0 = out
    else:
        op.eps = out


def _gathers(q3r, job: _Job) -> bool:
    """Whether ``job`` is rebuilt from its gathered rows: :data:`REBUILD`, or under ``"auto"`` when gathering the
    operator's ``m n`` numbers (all-gather: ``(p - 1) / p`` of them on the wire per process) costs no more than
    the sharded maths' all-reduces (``2 (p - 1) / p`` of their payload): per randomized pass two fp64 ``(l, l)``
    Grams and one ``(n, l)`` product, or the fp64 ``(n, n)`` Gram of an exact rebuild of a tall operator (a wide
    one gathers its rows anyway). Refinement passes are counted for an operator whose last sharded rebuild
    failed the Ritz check."""
    if REBUILD != "auto":
        return REBUILD == "gather"
    op, size = job.op, job.X.element_size()
    gather = size * op.m * op.n
    if not _randomized_path(q3r, job):
        return op.m <= op.n or gather <= 2 * 8 * op.n * op.n
    from ..ops.truncated_svd import sketch_width

    l = sketch_width((op.m, op.n), job.k, q3r.oversample)
    passes = 1 + (0 if job.mode == "warm" else q3r.n_iter)
    if getattr(op, "_sharded_refined", False):  # its last sharded rebuild failed the Ritz check: expect it again
        passes += 1 + max(1, q3r.n_iter)
    return gather <= 2 * passes * (2 * 8 * l * l + size * l * op.n)


def _rebuild_gathered(q3r, jobs: list[_Job], group) -> None:
    """Rebuild ``jobs`` from their all-gathered rows with ``Q3R._refresh_ops`` itself (the single-process path,
    on every process: same SVD, check, refinement, widening and eps), then keep this process's rows of ``U``."""
    from .operator import _Operator

    shadows = []
    for job, full in zip(jobs, _gather_rows(jobs, group), strict=True):
        op = job.op
        shadow = _Operator(full, None, op.rank, op.name)
        shadow.eps, shadow.eps0, shadow.basis = op.eps, op.eps0, op.basis
        shadow.set_triplets(torch.zeros(op.m, op.k, dtype=full.dtype, device=full.device), op.S, op.Vh)
        shadows.append((job.i, shadow))
    q3r._refresh_ops(shadows)
    for job, (_, shadow) in zip(jobs, shadows, strict=True):
        op, (a, b) = job.op, shard_of(job.op).within
        op.eps, op.eps0, op.basis = shadow.eps, shadow.eps0, shadow.basis
        op.set_triplets(shadow.U[a:b], shadow.S, shadow.Vh)


def _agree(jobs: list[_Job], group) -> None:
    """Check that every process kept the same number of triplets and eps (the decisions come from identical
    all-reduced or gathered data, but a replicated SVD could still round differently with other thread counts:
    later collectives would then mismatch). One tiny broadcast from the group's first process."""
    mine = torch.tensor([[float(job.op.k), float(job.op.eps)] for job in jobs], dtype=torch.float64)
    theirs = mine.clone()
    _dist.flat_broadcast([theirs], src=_dist.group_src(group), group=group)
    bad = [job.op.name for job, a, b in zip(jobs, mine.tolist(), theirs.tolist(), strict=True) if a != b]
    if bad:
        raise RuntimeError(f"Q3R: the processes disagree on the rebuilt operators {bad} (kept count or eps); "
                           "run every process with the same torch.set_num_threads so replicated SVDs agree")


@torch.no_grad()
def refresh_ops(q3r, items: list[tuple[int, object]]) -> None:
    """Rebuild the operators ``items`` (index, operator) of sharded weights; every process calls it with the same
    items (they are not split over ranks: each process works on its rows of all of them). Sets
    ``q3r.sharded_rebuild`` = ``{"operators", "checked", "refined", "exact"}`` counts of this rebuild (as
    ``Q3R.last_rebuild`` for the others).

    Mirrors ``Q3R._refresh_ops``, ``Q3R._refine`` and ``Q3R._settle``: the same number of triplets asked for,
    the same SVD mode per operator (``Q3R._svd_mode``) and sketch, the same a-posteriori check, eps moved by
    ``Q3R._next_eps``, widening (a cold SVD of twice the width) while the last sigma is above eps.
    """

    work = []
    for i, op in items:
        kmax = min(op.m, op.n)
        if op.rank < kmax:
            k = min(kmax, -(-(max(op.rank, op.k) + 1 + _WIDEN_MARGIN) // _K_ROUND) * _K_ROUND)
            X = local_view(op, op.weight.detach()).to(op.cdtype)
            work.append(_Job(i, op, X, k, q3r._svd_mode(op), op.basis))
    q3r.sharded_rebuild = {"operators": len(work), "checked": 0, "refined": 0, "exact": 0}
    if not work:
        return
    finite = finite_flags([job.op.weight for job in work])  # all-reduced: every process raises alike
    if not all(finite):
        raise ValueError(f"Q3R: the weight of {work[finite.index(False)].op.name} contains NaN or Inf")
    for group, jobs in _groups([(job.op, job) for job in work]):
        everyone = jobs = [job for _, job in jobs]
        gathered = [job for job in jobs if _gathers(q3r, job)]
        if gathered:
            _rebuild_gathered(q3r, gathered, group)
        jobs = [job for job in jobs if job not in gathered]
        q3r.sharded_rebuild["gathered"] = len(gathered)
        _svds(q3r, jobs, group)
        _check_and_refine(q3r, jobs, group)
        for job in jobs:
            _move_eps(q3r, job.op, job.host_s[job.op.rank])
        while jobs:
            widen = []
            for job in jobs:
                op, host_s = job.op, job.host_s
                cut = op.eps + _KEEP_ULPS * torch.finfo(op.cdtype).eps * host_s[0]
                if job.k < min(op.m, op.n) and host_s[-1] > cut:
                    job.k = min(2 * job.k, min(op.m, op.n))
                    job.mode, job.basis = q3r._svd_mode(op, warm=False), None
                    widen.append(job)
                    continue
                keep = sum(1 for v in host_s if v > cut)
                op.basis = job.Vh if q3r.warm_start else None
                op.set_triplets(job.U[:, :keep], job.S[:keep], job.Vh[:keep])
            if widen:
                _svds(q3r, widen, group)
                _read_back(widen, group, False)
            jobs = widen
        _agree(everyone, group)
    invalidate(q3r)


# ---------------------------------------------------------------------------------------------- the step
def invalidate(q3r) -> None:
    """Forget the per-step products (after a rebuild or a state load)."""
    q3r.__dict__.pop("_sharded_products", None)


def _products(q3r, weight) -> dict:
    """``{id(op): P}`` with ``P = U^T X (k, n)`` summed over the processes, for the operators of ``weight``.

    All sharded weights' products are formed together, at the weights of the first call in this step, and
    summed in one flat all-reduce (per group and dtype); each weight's are handed out once, so a second call
    for the same weight in the same step forms them anew.
    """
    key = (q3r.t, tuple(id(op.U) for op in q3r.ops))  # a rebuild or a loaded state replaces every U
    cache = q3r.__dict__.get("_sharded_products")
    if cache is None or cache[0] != key or id(weight) not in cache[1]:
        cache = q3r._sharded_products = (key, _all_products(q3r))
    return cache[1].pop(id(weight))


def _all_products(q3r) -> dict[int, dict[int, torch.Tensor]]:
    """``{id(weight): {id(op): P}}`` for every sharded weight (one flat all-reduce per group)."""
    prods: dict[int, dict] = {id(op.weight): {} for op in q3r.ops if is_sharded(op.weight)}
    for group, members in _groups([op for op in q3r.ops if is_sharded(op.weight) and op.k]):
        Ps = [op.U.T @ local_view(op).to(op.cdtype) for op in members]
        _dist.flat_all_reduce(Ps, group=group)
        for op, P in zip(members, Ps, strict=True):
            prods[id(op.weight)][id(op)] = P
    return prods


def _step_weight(q3r, weight, P: dict, beta: float, alpha: float, rest: float, keep=None) -> None:
    """Covered rows ``X <- beta X + alpha (L X R - X)``, the other local rows ``X <- rest X`` (``keep``: a 0-d
    tensor, 1 apply / 0 leave the weight as it is)."""
    ops_w = [op for op in q3r.ops if op.weight is weight]
    local = weight.to_local()
    cdtype = ops_w[0].cdtype
    X_all = local.to(cdtype, copy=True) if keep is not None or local.dtype != cdtype or not local.is_contiguous() \
        else local
    for op in ops_w:
        a, b = shard_of(op).local
        X = X_all[a:b]
        if not op.k or a == b:
            if beta != 1.0:
                X.mul_(beta)
            continue
        Ud, V, Pk = _ud(op), op.Vh.T, P[id(op)]
        T = torch.addmm(X @ V, Ud, Pk @ V).mul_(op.d)  # (Q + U D C) D at the old X, (m_i, k)
        X.addmm_(Ud, Pk, beta=beta, alpha=alpha)  # beta X + alpha U D P
        X.addmm_(T, op.Vh, alpha=alpha)
    if rest != 1.0:  # local rows outside every operator (spans from the layout: no host read)
        covered = 0
        for a, b in sorted(shard_of(op).local for op in ops_w) + [(local.shape[0], local.shape[0])]:
            if a > covered:
                X_all[covered:a].mul_(rest)
            covered = max(covered, b)
    if keep is not None:
        local.lerp_(X_all.to(local.dtype), keep.to(local.dtype))  # exact for keep in {0, 1}
    elif X_all is not local:
        local.copy_(X_all)


def _ud(op) -> torch.Tensor:
    """``U D`` of ``op`` (local rows), formed once per set of triplets."""
    cached = getattr(op, "_sharded_ud", None)
    if cached is None or cached[0] is not op.U or cached[1] is not op.d:
        cached = op._sharded_ud = (op.U, op.d, op.U * op.d)
    return cached[2]


@torch.no_grad()
def decoupled_step_(q3r, weight, lr: float, weight_decay: float = 0.0, defer_scale: bool = False) -> float:
    """``Q3R.decoupled_step_`` for a sharded ``weight`` (same contract, applied to this process's rows).

    ``weight`` is a ``DTensor`` regularised by ``q3r``; its local tensor is updated in place (a weight of
    another dtype than the compute dtype is updated through a copy). A collective the first time in a step.
    """
    if not any(op.weight is weight for op in q3r.ops):
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not regularised by this Q3R")
    P = _products(q3r, weight)
    c, base = 2.0 * q3r.lmbda * lr, 1.0 - lr * weight_decay
    scale = base - c if defer_scale and base - c >= 0.5 else 1.0
    _step_weight(q3r, weight, P, (base - c) / scale, -c / scale, base / scale)
    return scale


@torch.no_grad()
def decoupled_steps_(q3r, settings, key=None, keep=None) -> None:
    """``Q3R.decoupled_steps_`` for every sharded weight of ``q3r``: ``(lr, wd) = settings[key(w)]`` (``key=None``:
    ``settings[None]``); one flat all-reduce of all thin products ``P``, then each weight's local rows.
    Every process must call it (a collective); nothing happens when no weight is sharded."""
    if not any(is_sharded(op.weight) for op in q3r.ops):
        return
    prods = _all_products(q3r)
    for w in {id(op.weight): op.weight for op in q3r.ops if is_sharded(op.weight)}.values():
        lr, wd = settings[None if key is None else key(w)]
        c, base = 2.0 * q3r.lmbda * lr, 1.0 - lr * wd
        _step_weight(q3r, w, prods[id(w)], base - c, -c, base, keep)


# ---------------------------------------------------------------------------------------------- the state
def gathered_U(ops: Sequence) -> dict[int, torch.Tensor]:
    """``{id(op): U (m, k)}``, the whole left vectors of every sharded operator, on every process (one flat
    all-reduce of the zero-padded rows per group). A collective: every process must call it."""
    out = {}
    for group, members in _groups([op for op in ops if is_sharded(op.weight)]):
        bufs = []
        for op in members:
            full = torch.zeros(op.m, op.k, dtype=op.U.dtype, device=op.U.device)
            a, b = shard_of(op).within
            full[a:b] = op.U
            bufs.append(full)
        _dist.flat_all_reduce(bufs, group=group)
        out.update({id(op): U for op, U in zip(members, bufs, strict=True)})
    return out


def local_rows(op, U: torch.Tensor) -> torch.Tensor:
    """This process's rows of a whole ``U (m, k)`` for ``op`` (``U`` itself when ``op``'s weight is not sharded)."""
    if not is_sharded(op.weight):
        return U
    a, b = shard_of(op).within
    return U[a:b]


def refuse(ops: Sequence, what: str) -> None:
    """``TypeError`` when any of ``ops`` regularises a sharded weight (for ``val``, ``grad``, ``factors``)."""
    names = [op.name for op in ops if is_sharded(op.weight)]
    if names:
        raise TypeError(f"Q3R.{what} assembles whole weights and does not support weights sharded by FSDP2 "
                        f"(DTensor): {names}; use AdamQ3R (or decoupled_step_), which works on the shards")


# ------------------------------------------------------------------------------------ hooks for Q3R itself
def refresh(q3r, items: list[tuple[int, object]]) -> list[tuple[int, object]]:
    """Rebuild every operator of ``q3r`` on a sharded weight (on every process, whatever ``items`` holds) and
    return the operators of ``items`` that are not sharded (for ``Q3R._refresh_ops``)."""
    sharded = [(i, op) for i, op in enumerate(q3r.ops) if is_sharded(op.weight)]
    if not sharded:
        return items
    refresh_ops(q3r, sharded)
    return [(i, op) for i, op in items if not is_sharded(op.weight)]


def share_states(q3r, me: int) -> None:
    """``Q3R._share_states`` over the operators of unsharded weights only (the sharded ones were rebuilt by every
    process and hold only their own rows of ``U``)."""
    keep = [i for i, op in enumerate(q3r.ops) if not is_sharded(op.weight)]
    if len(keep) == len(q3r.ops):
        q3r._share_states(me)
        return
    if not keep:
        return
    ops, owners = q3r.ops, q3r._owners
    try:
        q3r.ops, q3r._owners = [ops[i] for i in keep], [owners[i] for i in keep]
        q3r._share_states(me)
    finally:
        q3r.ops, q3r._owners = ops, owners


def plain(ops: Sequence) -> list:
    """The operators (or weights) of ``ops`` that are not sharded."""
    return [op for op in ops if not is_sharded(getattr(op, "weight", op))]



# ------------------------------------------------------------------------------------------- spectra
@torch.no_grad()
def eigenvalues(weights: Sequence) -> list[torch.Tensor]:
    """``sigma^2`` (eigenvalues of ``W^T W``, ascending, ``min(m, n)`` of them) of row-sharded ``DTensor`` weights
    ``W (m, n)``, identical on every process, without gathering a weight where the maths allows: a tall one
    (``m >= n``) all-reduces its fp64 Gram ``sum_i W_i^T W_i (n, n)`` (no more numbers than the weight) and takes
    ``eigvalsh``; a wide one, whose right Gram would be larger than itself, is all-gathered (one balanced buffer
    per dtype for all of them) and takes ``svdvals``. The contract of ``adapters.spectral.eigenvalues`` (HT-SR,
    stable ranks ``sum(lam) / max(lam)``) for a model sharded by ``fully_shard``. A collective."""
    out: list[torch.Tensor | None] = [None] * len(weights)
    tall, wide = [], []
    for i, w in enumerate(weights):
        if not is_sharded(w) or w.dim() != 2:
            raise TypeError(f"eigenvalues takes 2-D DTensor weights sharded by rows, got {type(w).__name__} of shape "
                            f"{tuple(w.shape)} (weight {i})")
        (tall if w.shape[0] >= w.shape[1] else wide).append(i)

    class _W:  # the fields of an operator that _shard/_layout/_gather_rows read: a whole weight
        def __init__(self, w):
            self.weight, self.rows, self.transposed = w, None, False
            self.m, self.n, self.name = w.shape[0], w.shape[1], f"weight {tuple(w.shape)}"

    for group, members in _groups([_W(weights[i]) for i in tall]):
        grams = [op.weight.to_local().to(torch.float64).T @ op.weight.to_local().to(torch.float64) for op in members]
        _dist.flat_all_reduce(grams, group=group)
        for op, G in zip(members, grams, strict=True):
            out[next(i for i in tall if weights[i] is op.weight)] = torch.linalg.eigvalsh(G).clamp_min(0)
    for group, members in _groups([_W(weights[i]) for i in wide]):
        jobs = [_Job(None, op, op.weight.to_local().to(_work_dtype(op.weight.dtype)), 0, "exact") for op in members]
        for op, full in zip(members, _gather_rows(jobs, group), strict=True):
            s = torch.linalg.svdvals(full)
            out[next(i for i in wide if weights[i] is op.weight)] = (s * s).sort().values
    return out  # type: ignore[return-value]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def stable_ranks(weights: Sequence, iters: int = 200, tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stable_rank (B,), sigma_max (B,))`` fp64 of row-sharded ``DTensor`` weights ``W (m, n)``, identical on every
    process, without gathering any weight (tall or wide): the sharded counterpart of ``ops.stable_rank`` /
    ``ops.spectral_norm``.

    ``||W||_F^2 = sum_i ||W_i||_F^2``: one all-reduce of ``B`` numbers per process group. ``sigma_max^2``: power
    iteration on ``W^T W = sum_i W_i^T W_i`` from the same start vector on every process; an iteration forms
    ``W_i^T (W_i v)`` locally and all-reduces the ``n``-vectors of all weights of a group in one flat fp64 buffer,
    so every process holds the same iterate and takes the same stopping decision (all Rayleigh quotients
    changed by at most ``tol`` relatively, or ``iters`` iterations). ``sigma_max`` is the square root of the last
    Rayleigh quotient; a zero weight gets stable rank 0 (as ``ops.stable_rank``). The stop on the relative change
    leaves an error of about ``tol / (1 - (sigma_2 / sigma_1)^2)``: close leading singular values need more
    iterations (hence the defaults, larger than ``ops.stable_rank``'s). A collective: every process calls it with
    the same weights in the same order.
    """
    for i, w in enumerate(weights):
        if not is_sharded(w) or w.dim() != 2:
            raise TypeError(f"stable_ranks takes 2-D DTensor weights sharded by rows, got {type(w).__name__} of "
                            f"shape {tuple(w.shape)} (weight {i})")
    fro = torch.zeros(len(weights), dtype=torch.float64)
    sigma_sq = torch.zeros(len(weights), dtype=torch.float64)

    class _W:  # what _groups / shard_of read
        def __init__(self, i, w):
            self.i, self.weight, self.rows, self.transposed, self.name = i, w, None, False, f"weight {i}"

    for group, members in _groups([_W(i, w) for i, w in enumerate(weights)]):
        local = [op.weight.to_local().to(torch.float64) for op in members]
        f = torch.stack([x.square().sum() for x in local]).cpu()
        _dist.flat_all_reduce([f], group=group)
        # a deterministic start with every component non-zero (not orthogonal to the top right vector in general)
        vs = [torch.linspace(1.0, 2.0, x.shape[1], dtype=torch.float64, device=x.device) for x in local]
        vs = [v / v.norm() for v in vs]
        rq = torch.zeros(len(members), dtype=torch.float64)
        for _ in range(iters):
            zs = [x.T @ (x @ v) for x, v in zip(local, vs, strict=True)]
            _dist.flat_all_reduce(zs, group=group)
            new = torch.stack([(z @ v).cpu() for z, v in zip(zs, vs, strict=True)])  # v^T W^T W v, |v| = 1
            norms = [z.norm() for z in zs]
            vs = [z / n if float(n) > 0 else v for z, n, v in zip(zs, norms, vs, strict=True)]
            done = bool(((new - rq).abs() <= tol * new.abs()).all())
            rq = new
            if done:
                break
        for j, op in enumerate(members):
            fro[op.i], sigma_sq[op.i] = f[j], rq[j].clamp_min(0)
    sr = torch.where(sigma_sq == 0, torch.zeros_like(fro), fro / sigma_sq.clamp_min(1e-300))
    return sr, sigma_sq.sqrt()
