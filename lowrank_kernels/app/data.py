"""Data for ``lowrank-kernels train``: sklearn digits, a user's text file (causal LM) or synthetic tensors.

Every dataset is a set of in-memory tensors; the batch order of an epoch is a pure function of
``(seed, epoch)`` so that a resumed run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import ConfigError


@dataclass
class Data:
    """``x_train (N, ...)``, ``y_train (N, ...)`` and the test split; ``task`` is ``classify`` or ``lm``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    num_classes: int  # classes, or the vocabulary size of an LM
    description: str


def _synthetic_images(seed: int, n_train: int = 512, n_test: int = 256) -> Data:
    # labels come from a fixed random linear teacher, so the task is learnable (not noise)
    g = torch.Generator().manual_seed(seed + 12345)
    x = torch.rand(n_train + n_test, 1, 8, 8, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    y = ((x.flatten(1) - 0.5) @ teacher).argmax(1)
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], "classify", 10,
                f"synthetic images ({n_train} train / {n_test} test, 1x8x8, 10 classes)")


def _windows(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = (tokens.numel() - 1) // seq_len
    x = tokens[: n * seq_len].view(n, seq_len)
    y = tokens[1: n * seq_len + 1].view(n, seq_len)
    return x, y


def _lm_data(tokens: torch.Tensor, vocab: int, seq_len: int, what: str) -> Data:
    split = int(tokens.numel() * 0.9)
    x_tr, y_tr = _windows(tokens[:split], seq_len)
    x_te, y_te = _windows(tokens[split:], seq_len)
    if len(x_tr) < 1 or len(x_te) < 1:
        raise ConfigError(f"{what} is too short for seq_len={seq_len}: need at least {10 * (seq_len + 1) + 1} "
                          f"tokens, it has {tokens.numel()}")
    return Data(x_tr, y_tr, x_te, y_te, "lm", vocab,
                f"{what}: {tokens.numel()} tokens, vocab {vocab}, {len(x_tr)} train / {len(x_te)} test windows")


def _synthetic_text(seed: int, seq_len: int, n_tokens: int = 20000, vocab: int = 16) -> Data:
    # a fixed random Markov chain: each token is followed by one of two successors (p = 0.8 / 0.2), so the
    # best next-token accuracy is 0.8 and the best perplexity about 1.65 -- learnable in a few hundred steps
    g = torch.Generator().manual_seed(seed + 777)
    succ = torch.stack([torch.randperm(vocab, generator=g)[:2] for _ in range(vocab)])
    pick = (torch.rand(n_tokens, generator=g) > 0.8).long()
    tokens = torch.empty(n_tokens, dtype=torch.int64)
    tokens[0] = 0
    for i in range(1, n_tokens):
        tokens[i] = succ[tokens[i - 1], pick[i]]
    return _lm_data(tokens, vocab, seq_len, "synthetic Markov-chain tokens")


def _text_file(path: str, tokenizer: str, seq_len: int) -> Data:
    if not os.path.isfile(path):
        raise ConfigError(f"data file {path!r} not found (data must be 'digits', 'synthetic' or a text file)")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read data file {path!r}: {exc.strerror}") from None
    if tokenizer == "char":
        units = list(text)
    elif tokenizer == "word":
        units = text.split()
    else:
        raise ConfigError(f"tokenizer={tokenizer!r} is not one of 'char', 'word'")
    if not units:
        raise ConfigError(f"data file {path!r} is empty")
    vocab = {u: i for i, u in enumerate(sorted(set(units)))}
    tokens = torch.tensor([vocab[u] for u in units], dtype=torch.int64)
    return _lm_data(tokens, len(vocab), seq_len, f"{os.path.basename(path)} ({tokenizer} tokens)")


def make_data(data: str, task: str, seed: int, seq_len: int = 32, tokenizer: str = "char") -> Data:
    """Load ``data`` for a model whose task is ``classify`` (vit-tiny) or ``lm`` (gpt-tiny)."""
    if task == "classify":
        if data == "digits":
            from .models import load_digits

            x_tr, y_tr, x_te, y_te = load_digits(seed=0)
            return Data(x_tr, y_tr, x_te, y_te, "classify", 10,
                        f"sklearn digits ({len(x_tr)} train / {len(x_te)} test, 1x8x8, 10 classes)")
        if data == "synthetic":
            return _synthetic_images(seed)
        raise ConfigError(f"data={data!r} does not fit model vit-tiny (use 'digits' or 'synthetic'; text files "
                          "are for gpt-tiny)")
    if data == "digits":
        raise ConfigError("data='digits' is an image dataset; gpt-tiny needs 'synthetic' or a text file")
    if data == "synthetic":
        return _synthetic_text(seed, seq_len)
    return _text_file(data, tokenizer, seq_len)


def split_classes(data: Data, lo: int, hi: int) -> Data:
    """The samples of classes ``lo <= y < hi`` of a classification set, relabelled ``y - lo`` (``hi - lo`` classes).

    The adapter techniques pretrain a base on one half of the classes and adapt it to the other half."""
    if data.task != "classify":
        raise ConfigError(f"a class split needs a classification dataset, not {data.description}")
    if not 0 <= lo < hi <= data.num_classes:
        raise ConfigError(f"class split [{lo}, {hi}) is not inside the {data.num_classes} classes of "
                          f"{data.description}")
    tr = (data.y_train >= lo) & (data.y_train < hi)
    te = (data.y_test >= lo) & (data.y_test < hi)
    return Data(data.x_train[tr], data.y_train[tr] - lo, data.x_test[te], data.y_test[te] - lo, "classify", hi - lo,
                f"{data.description.split(' (')[0]}, classes {lo}-{hi - 1} ({int(tr.sum())} train / {int(te.sum())} "
                f"test)")


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of ``epoch``: a permutation of ``range(n)`` that depends only on (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)
