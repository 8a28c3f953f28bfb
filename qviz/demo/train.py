"""Train DigitsNet on the digits train split and write ``digits_cnn.npz`` next to this file.

Run ``python -m qviz.demo.train``. Deterministic (fixed seeds, deterministic algorithms, one
thread), a few seconds on a laptop CPU. The weights are stored as plain numpy arrays keyed by
state-dict name, so loading them never unpickles anything.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qviz.demo.data import accuracy, load_digits_split
from qviz.demo.model import DigitsNet

DEFAULT_OUT = Path(__file__).with_name("digits_cnn.npz")


def train(epochs: int = 12, batch_size: int = 32, lr: float = 3e-3, seed: int = 0) -> DigitsNet:
    """A freshly trained DigitsNet (eval mode); same seed, same weights."""
    torch.manual_seed(seed)
    det = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        splits = load_digits_split()
        x, y = splits["train"]
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        loss_fn = nn.CrossEntropyLoss()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), batch_size):
                idx = order[i : i + batch_size]
                if len(idx) < 2:  # BatchNorm needs more than one sample
                    continue
                opt.zero_grad()
                loss_fn(model(x[idx]), y[idx]).backward()
                opt.step()
            sched.step()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=det_warn)
    return model.eval()


def save_npz(model: nn.Module, path: str | Path) -> None:
    """Write the state dict as float32/int64 numpy arrays (``np.savez_compressed``)."""
    arrays = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        arrays[name] = t.numpy().astype(np.float32 if t.is_floating_point() else np.int64)
    np.savez_compressed(path, **arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = train(epochs=args.epochs, seed=args.seed)
    elapsed = time.perf_counter() - start
    splits = load_digits_split()
    val = accuracy(model, [splits["val"]])
    test = accuracy(model, [splits["test"]])
    save_npz(model, args.out)
    size_kb = args.out.stat().st_size / 1024
    print(
        f"trained in {elapsed:.1f} s: val {val:.2%}, test {test:.2%}; "
        f"wrote {args.out} ({size_kb:.0f} KB)"
    )


if __name__ == "__main__":
    main()
