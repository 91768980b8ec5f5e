"""``LowRankLinear``: a drop-in ``nn.Linear`` whose weight is kept factored as ``W = U V``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._checks import check_positive_int
from .._modules import is_conv1d, is_linear_like, linear_weight
from ..ops.lowrank_matmul import lowrank_matmul


@dataclass
class ResizeInfo:
    """What :meth:`LowRankLinear.resize` did, for remapping optimizer state.

    Shapes: ``left`` and ``right`` are ``(old_rank, new_rank)``; ``singular_values`` is ``(new_rank,)``
    (the singular values of the new ``U V``, descending, zeros for added directions).

    Exact relations (``k = min(old_rank, new_rank)`` kept directions, the rest ``added`` ones):

    * parameters: ``U_new = U_old @ left`` and ``V_new[:k] = right[:, :k]^T @ V_old``. ``left[:, k:]``
      and ``right[:, k:]`` are zero: added columns of ``U`` are zero, added rows of ``V`` are new
      directions orthogonal to the row space of ``V_old`` (so they are *not* ``right^T V_old``).
      The ``U`` relation is exact when ``U_old`` has full column rank (the generic case; otherwise
      ``left`` is the least-squares map and ``U_new`` itself is still exact), likewise for ``V``.
    * gradients (hence Adam's first moment, an average of gradients) transform the other way round:
      ``dL/dU_new[:, :k] = dL/dU_old @ right[:, :k]`` and ``dL/dV_new = left^T @ dL/dV_old`` (the
      added rows get 0). These are exact when the resize keeps the function (growing, or resizing to
      the same rank) and a first-order approximation when shrinking. Use :meth:`map_grad_U` /
      :meth:`map_grad_V`. Elementwise second moments have no exact map; a caller may map
      ``sqrt(v)`` like a gradient, or reset them.
    """

    old_rank: int
    new_rank: int
    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor

    @property
    def added(self) -> int:
        """How many new directions were appended (the last ``added`` columns of U / rows of V)."""
        return max(0, self.new_rank - self.old_rank)

    def map_param_U(self, t: torch.Tensor) -> torch.Tensor:
        """``(out, old_rank) -> (out, new_rank)`` the way ``U`` was mapped (added columns zero)."""
        return t @ self.left.to(t.dtype)

    def map_param_V(self, t: torch.Tensor) -> torch.Tensor:
        """``(old_rank, in) -> (new_rank, in)`` the way the kept rows of ``V`` were mapped (added rows zero)."""
        return self.right.to(t.dtype).t() @ t

    def map_grad_U(self, t: torch.Tensor) -> torch.Tensor:
        """``(out, old_rank) -> (out, new_rank)``: a gradient (or Adam ``exp_avg``) of ``U``."""
        return t @ self.right.to(t.dtype)

    def map_grad_V(self, t: torch.Tensor) -> torch.Tensor:
        """``(old_rank, in) -> (new_rank, in)``: a gradient (or Adam ``exp_avg``) of ``V``."""
        return self.left.to(t.dtype).t() @ t


def forget_grad_accumulator(p: torch.Tensor) -> None:
    """Drop the cached autograd accumulator of ``p`` after its ``.data`` changed shape.

    ``p.data = x`` keeps the leaf's cached ``AccumulateGrad`` node, which remembers the old shape; while anything
    still references it (the previous step's ``loss`` graph, hooks, DDP) the next backward fails with "returned
    an invalid gradient ... expected shape compatible with" the old shape. PyTorch resets that cache only when
    ``.data`` changes dtype or device, so the data passes through another dtype.
    """
    data = p.data
    p.data = torch.empty(0, dtype=torch.float64 if data.dtype != torch.float64 else torch.float32,
                         device=data.device)
    p.data = data


class LowRankLinear(nn.Module):
    """``y = x (U V)^T + bias`` computed as ``(x V^T) U^T + bias`` by :func:`ops.lowrank_matmul`.

    Parameters: ``U (out_features, rank)``, ``V (rank, in_features)``, ``bias (out_features,)`` or None.
    Input ``(..., in_features)``, output ``(..., out_features)``.

    Loading a state dict whose ``U``/``V`` have another rank resizes the layer to that rank first
    (``load_state_dict``, ``transformers`` ``Trainer`` resume, :func:`load_lowrank_pretrained`): ``self.U`` and
    ``self.V`` stay the same ``Parameter`` objects, their ``.data`` is swapped, and ``.grad`` is dropped. An
    optimizer holding them must get its state from the same checkpoint (as ``Trainer`` resume does).
    ``in_features``/``out_features`` must agree; a ``U``/``V`` pair of inconsistent rank is left to
    ``load_state_dict``'s own size-mismatch error.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        check_positive_int(rank, "rank")
        kw = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def reset_parameters(self) -> None:
        """Entries of ``U V`` get variance ``1 / (3 in)``, as ``nn.Linear``'s default init gives ``W``."""
        bound_v = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.V, -bound_v, bound_v)  # Var = 1 / (3 in)
        nn.init.uniform_(self.U, -math.sqrt(3.0 / self.rank), math.sqrt(3.0 / self.rank))  # Var = 1 / r
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound_v, bound_v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowrank_matmul(x, self.U, self.V, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")

    # ------------------------------------------------------------------------------- conversions
    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int) -> LowRankLinear:
        """Best rank-``rank`` approximation of ``linear`` (truncated SVD, split ``U = U_r sqrt(S)``,
        ``V = sqrt(S) Vh_r``), on the same device and dtype; the bias is copied.

        ``linear`` is an ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2 family, weight stored ``(in, out)``;
        read as ``(out, in)`` through ``_modules.linear_weight``): the result is always in ``nn.Linear``'s
        orientation and equals the layer exactly (up to rounding) at ``rank = min(in, out)``.
        """
        if not is_linear_like(linear):
            raise TypeError(f"linear must be an nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        check_positive_int(rank, "rank")
        w = linear_weight(linear).detach()
        out_f, in_f = w.shape
        if rank > min(out_f, in_f):
            kind = "Conv1D" if is_conv1d(linear) else "Linear"
            raise ValueError(f"rank={rank} exceeds min(out_features, in_features) = {min(out_f, in_f)} "
                             f"of this {kind} ({in_f} -> {out_f})")
        layer = cls(in_f, out_f, rank, bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        root = s[:rank].sqrt()
        with torch.no_grad():
            layer.U.copy_(u[:, :rank] * root)
            layer.V.copy_(root[:, None] * vh[:rank])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with weight ``U V`` (product formed in fp64) and the same bias."""
        u = self.U.detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=u.device, dtype=u.dtype)
        with torch.no_grad():
            linear.weight.copy_(u.double() @ self.V.detach().double())
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear

    # ------------------------------------------------------------------------------ state dicts
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        u, v = state_dict.get(prefix + "U"), state_dict.get(prefix + "V")
        if isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) and u.dim() == 2 and v.dim() == 2:
            rank = u.shape[1]
            consistent = (u.shape[0] == self.out_features and v.shape == (rank, self.in_features)
                          and 1 <= rank <= min(self.in_features, self.out_features))
            if consistent and rank != self.rank:
                self._set_rank(rank)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def _set_rank(self, rank: int) -> None:
        """Reshape ``U``/``V`` to ``rank`` in place (same ``Parameter`` objects, contents unspecified: a load
        overwrites them); stale ``.grad`` tensors are dropped."""
        for param, shape in ((self.U, (self.out_features, rank)), (self.V, (rank, self.in_features))):
            param.data = torch.empty(shape, dtype=param.dtype, device=param.device)
            forget_grad_accumulator(param)
            param.grad = None

    # ----------------------------------------------------------------------------------- resize
    @torch.no_grad()
    def resize(self, new_rank: int) -> ResizeInfo:
        """Change the rank in place; ``self.U`` / ``self.V`` stay the same ``Parameter`` objects.

        The SVD of ``U V`` is found without forming it: ``U = Q_U R_U``, ``V^T = Q_V R_V`` (QR), then
        the SVD ``P S Q^T`` of the ``r x r`` core ``R_U R_V^T``; so ``U V = (Q_U P) S (Q_V Q)^T``. The
        new factors are ``U = Q_U P sqrt(S)``, ``V = sqrt(S) (Q_V Q)^T`` (balanced, descending
        singular values), truncated to the top ``new_rank`` when shrinking (the best rank-``new_rank``
        approximation). Growing keeps ``U V`` exactly: the added columns of ``U`` are zero and the added
        rows of ``V`` are an orthonormal completion of ``V``'s row space, scaled by ``sqrt`` of the
        smallest kept singular value (zero singular values for the new directions, yet ``dL/dU`` of the
        new columns is non-zero so they can learn; two zero factors would be a saddle point).

        Raises ``ValueError`` when ``new_rank`` exceeds ``min(in_features, out_features)``. Returns a
        :class:`ResizeInfo` describing how parameters and gradients map (for optimizer state; the
        optimizer's own state is not touched here, see ``rank.resize``). A ``.grad`` whose shape no
        longer matches is dropped (set to None). Computed in fp64 on the parameters' device.
        """
        check_positive_int(new_rank, "new_rank")
        if new_rank > min(self.in_features, self.out_features):
            raise ValueError(f"new_rank={new_rank} exceeds min(in_features, out_features) = "
                             f"{min(self.in_features, self.out_features)}")
        old = self.rank
        dtype = self.U.dtype
        q_u, r_u = torch.linalg.qr(self.U.double())  # (out, r), (r, r)
        q_v, r_v = torch.linalg.qr(self.V.double().t())  # (in, r), (r, r)
        p, s, qh = torch.linalg.svd(r_u @ r_v.t())
        k = min(old, new_rank)
        root = s[:k].sqrt()
        u_new = (q_u @ p[:, :k]) * root
        v_new = root[:, None] * (qh[:k] @ q_v.t())
        # left/right as least-squares maps (exact for full-rank factors): U_old @ left = U_new etc.
        left = torch.zeros(old, new_rank, dtype=torch.float64, device=s.device)
        right = torch.zeros_like(left)
        left[:, :k] = torch.linalg.pinv(r_u) @ (p[:, :k] * root)
        right[:, :k] = torch.linalg.pinv(r_v) @ (qh[:k].t() * root)
        sv = torch.zeros(new_rank, dtype=torch.float64, device=s.device)
        sv[:k] = s[:k]
        if new_rank > old:
            extra = new_rank - old
            u_new = torch.cat([u_new, u_new.new_zeros(self.out_features, extra)], dim=1)
            v_new = torch.cat([v_new, self._completion(q_v, extra, s)], dim=0)
        for param, data in ((self.U, u_new), (self.V, v_new)):
            param.data = data.to(dtype).contiguous()
            forget_grad_accumulator(param)
        for p in (self.U, self.V):
            if p.grad is not None and p.grad.shape != p.shape:
                p.grad = None
        # The maps stay fp32 even for bf16/fp16 factors: they are applied to fp32 optimizer moments.
        maps_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        return ResizeInfo(old, new_rank, left.to(maps_dtype), right.to(maps_dtype), sv.to(maps_dtype))

    @staticmethod
    def _completion(q: torch.Tensor, extra: int, s: torch.Tensor) -> torch.Tensor:
        """``(extra, n)`` orthonormal rows orthogonal to the columns of ``q (n, r)``, scaled by ``sqrt(s_min)``."""
        n = q.shape[0]
        g = torch.randn(n, extra, dtype=q.dtype, device=q.device)
        for _ in range(2):  # project twice: one Gram-Schmidt pass loses orthogonality in floating point
            g = g - q @ (q.t() @ g)
        basis, _ = torch.linalg.qr(g)
        positive = s[s > 0]
        scale = positive.min().sqrt() if positive.numel() else torch.ones((), dtype=q.dtype, device=q.device)
        return basis.t() * scale
