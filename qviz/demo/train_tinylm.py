"""Train TinyLM on the standard library's sources and write ``tinylm.npz`` next to this file.

Run ``python -m qviz.demo.train_tinylm``. Fixed seeds (the random windows and the initial
weights), one thread, AdamW with a linear warm-up and cosine decay; under ten minutes on a
laptop CPU core (one thread: on a shared machine, two threads contend and run slower). The weights are stored as float16 numpy arrays keyed by state-dict name (half the bytes;
the perplexity printed is the stored weights', read back), with the architecture's sizes beside
them, so loading never unpickles anything.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from qviz.analysis.language import perplexity
from qviz.demo.tinylm import CONTEXT, VOCAB, TinyLM, eval_batches, load_tinylm, train_text

DEFAULT_OUT = Path(__file__).with_name("tinylm.npz")
SIZES = {"n_layers": 3, "d_model": 128, "n_heads": 4}


def train(steps: int = 2000, batch_size: int = 32, lr: float = 3e-3, warmup: int = 100, seed: int = 0,
          log_every: int = 0) -> TinyLM:
    """A freshly trained TinyLM (eval mode): ``steps`` AdamW steps on random windows of the
    training text; same seed, same windows and initial weights. ``log_every`` > 0 prints the
    training loss every that many steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(steps, batch_size, lr, warmup, seed, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(steps: int, batch_size: int, lr: float, warmup: int, seed: int, log_every: int) -> TinyLM:
    torch.manual_seed(seed)
    text = train_text()
    model = TinyLM(**SIZES)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(CONTEXT + 1)
    model.train()
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(text) - CONTEXT - 1, (batch_size, 1), generator=gen)
        window = text[starts + offsets]
        loss = F.cross_entropy(model(window[:, :-1]).flatten(0, 1), window[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if log_every and step % log_every == 0:
            print(f"step {step}/{steps}: training loss {loss.item():.3f} nats per byte", flush=True)
    return model.eval()


def save_npz(model: TinyLM, path: str | Path) -> None:
    """Write the state dict as float16 arrays and the sizes as ``config.*`` ints (``np.savez_compressed``)."""
    arrays = {name: t.detach().cpu().numpy().astype(np.float16) for name, t in model.state_dict().items()}
    arrays.update({f"config.{key}": np.int64(value) for key, value in SIZES.items()})
    np.savez_compressed(path, **arrays)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    model = train(steps=args.steps, seed=args.seed, log_every=100)
    elapsed = time.perf_counter() - start
    save_npz(model, args.out)
    held_out = perplexity(load_tinylm(args.out), eval_batches())
    size_kb = args.out.stat().st_size / 1024
    print(f"trained in {elapsed:.0f} s: held-out perplexity {held_out:.3f} per byte (uniform {VOCAB}); "
          f"wrote {args.out} ({size_kb:.0f} KB)")


if __name__ == "__main__":
    main()
