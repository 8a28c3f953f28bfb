"""Deterministic data for the digits demo: scikit-learn's 8x8 digits, split, scaled, batched.

The images ship with scikit-learn, so nothing is downloaded. Every function here returns the
same tensors on every call and every machine: the split comes from a fixed-seed permutation
and batches are contiguous slices of a split, never a fresh shuffle.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch

SPLIT_SEED = 0
N_TRAIN, N_VAL, N_TEST = 1197, 300, 300
NUM_CLASSES = 10

# Mean and std of the train split's pixels after scaling to [0, 1] (computed once, fixed here
# so that inputs never depend on which split was loaded).
MEAN = 0.3058
STD = 0.3756


def preprocess(images) -> torch.Tensor:
    """Raw digits (..., 8, 8) with values 0..16 -> normalised float32 tensor (N, 1, 8, 8)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8)
    return (x / 16.0 - MEAN) / STD


@lru_cache(maxsize=1)
def _splits() -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = len(digits.target)
    if n != N_TRAIN + N_VAL + N_TEST:
        raise RuntimeError(f"expected {N_TRAIN + N_VAL + N_TEST} digits from scikit-learn, got {n}")
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    x = preprocess(digits.images[order])
    y = torch.as_tensor(digits.target[order].astype(np.int64))
    cuts = [0, N_TRAIN, N_TRAIN + N_VAL, n]
    return tuple((x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True))


def load_digits_split() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The fixed train/val/test split (1197/300/300) as ``{name: (inputs, labels)}``.

    Inputs are float32 (N, 1, 8, 8), normalised; labels are int64 (N,). Fresh copies each call.
    """
    return {
        name: (x.clone(), y.clone())
        for name, (x, y) in zip(("train", "val", "test"), _splits(), strict=True)
    }


def _batches(split: int, n_batches: int, batch_size: int, what: str) -> list[torch.Tensor]:
    if n_batches < 1 or batch_size < 1:
        raise ValueError(f"{what}: n_batches and batch_size must be >= 1")
    x, _ = _splits()[split]
    if n_batches * batch_size > len(x):
        raise ValueError(
            f"{what}: {n_batches} x {batch_size} samples asked, the split has only {len(x)}"
        )
    return [x[i * batch_size : (i + 1) * batch_size].clone() for i in range(n_batches)]


def calibration_batches(n_batches: int = 4, batch_size: int = 32) -> list[torch.Tensor]:
    """Calibration data: the first ``n_batches * batch_size`` train images, as input tensors."""
    return _batches(0, n_batches, batch_size, "calibration_batches")


def eval_batches(n_batches: int = 2, batch_size: int = 64) -> list[torch.Tensor]:
    """Evaluation data: the first ``n_batches * batch_size`` test images, as input tensors.

    This is qviz's ``eval_data`` contract (an iterable of model inputs); the labels of the
    same images come from :func:`eval_labels` with the same arguments.
    """
    return _batches(2, n_batches, batch_size, "eval_batches")


def eval_labels(n_batches: int = 2, batch_size: int = 64) -> list[torch.Tensor]:
    """Labels (int64) matching :func:`eval_batches` called with the same arguments."""
    if n_batches < 1 or batch_size < 1:
        raise ValueError("eval_labels: n_batches and batch_size must be >= 1")
    _, y = _splits()[2]
    if n_batches * batch_size > len(y):
        raise ValueError(
            f"eval_labels: {n_batches} x {batch_size} samples asked, the split has only {len(y)}"
        )
    return [y[i * batch_size : (i + 1) * batch_size].clone() for i in range(n_batches)]


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` over ``(inputs, labels)`` pairs.

    Without ``batches``, the whole test split. The model runs in eval mode (restored after);
    quantized outputs are dequantized first.
    """
    if batches is None:
        batches = [_splits()[2]]
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        correct = total = 0
        for x, y in batches:
            out = model(x)
            if isinstance(out, torch.Tensor) and out.is_quantized:
                out = out.dequantize()
            correct += int((out.argmax(dim=1) == y).sum())
            total += len(y)
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)
    if total == 0:
        raise ValueError("accuracy: no samples in batches")
    return correct / total
