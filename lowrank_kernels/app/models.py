"""Small reference models for the demo, the tests and the benchmarks (no downloads).

Module names follow timm / GPT-2 conventions so that target lists read naturally:
``blocks.{i}.attn.qkv`` (fused Q, K, V: out = 3 * dim), ``blocks.{i}.attn.proj``,
``blocks.{i}.mlp.fc1``, ``blocks.{i}.mlp.fc2``, ``head`` / ``lm_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` Linear (rows: [Q; K; V], head-major inside each)."""

    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.head_dim, self.causal = dim, heads, dim // heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim). With ``causal`` position t attends to positions <= t only."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.dim))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A Vision Transformer for small images (default: scikit-learn digits, 1x8x8, 10 classes).

    Input ``(B, C, H, W)`` -> logits ``(B, num_classes)``. Patches are embedded by a Linear
    (``patch_embed``), a learned position embedding is added, mean pooling feeds ``head``.
    """

    def __init__(self, image_size: int = 8, patch_size: int = 2, in_chans: int = 1, num_classes: int = 10,
                 dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.config = dict(image_size=image_size, patch_size=patch_size, in_chans=in_chans,
                           num_classes=num_classes, dim=dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        b, c, h, w = x.shape
        x = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patchify(x)) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))


class TinyGPT(nn.Module):
    """A causal (GPT-style) language model: tokens ``(B, T)`` -> logits ``(B, T, vocab)``.

    The attention is masked causally (the adaptive low-rank training code's v10 transformer was not, which
    leaks the future).
    """

    def __init__(self, vocab_size: int, dim: int = 64, depth: int = 2, heads: int = 4, max_len: int = 128,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size)
        self.max_len = max_len
        self.config = dict(vocab_size=vocab_size, dim=dim, depth=depth, heads=heads, max_len=max_len,
                           mlp_ratio=mlp_ratio)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x = self.tok_embed(idx) + self.pos_embed[:, :t]
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


def vit_tiny(**overrides) -> TinyViT:
    """The demo ViT for 8x8 digits (about 70k parameters with the defaults)."""
    return TinyViT(**overrides)


def gpt_tiny(vocab_size: int, **overrides) -> TinyGPT:
    return TinyGPT(vocab_size, **overrides)


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """scikit-learn's handwritten digits (1797 real 8x8 images, shipped inside the package).

    Returns ``(x_train, y_train, x_test, y_test)``: images ``(N, 1, 8, 8)`` float32 scaled to
    [0, 1], labels ``(N,)`` int64. The split is stratified and fixed by ``seed``.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    data = _load()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y.numpy())
    return x[tr], y[tr], x[te], y[te]


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def init_like_timm(model: nn.Module) -> None:
    """Truncated-normal Linear weights (std 0.02), zero biases: the ViT recipe."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
