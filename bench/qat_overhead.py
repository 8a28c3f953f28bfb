"""What ``qviz.watch(every=10, histograms_every=100)`` costs a QAT training loop.

Two identical QAT copies of the demo model (FX ``prepare_qat_fx`` by default) train side by side in
one process with the same SGD loop on the digits (batch 64): steps alternate plain / watched (the
order swaps every step) so machine load hits both alike. The watched copy runs inside one
``qviz.watch`` for the whole run and calls ``rec.log(loss=...)`` every step; both call
``loss.item()``. Every step is timed and the totals compared (snapshot and histogram steps
included: they are the overhead). Target: overhead under 5% of step time.

    python bench/qat_overhead.py                      # 1000 timed steps each, one thread
    python bench/qat_overhead.py --flow eager --steps 300
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

for _category in (DeprecationWarning, UserWarning, FutureWarning):
    warnings.filterwarnings("ignore", category=_category)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao import quantization as tq  # noqa: E402
from torch.ao.quantization.quantize_fx import prepare_qat_fx  # noqa: E402

import qviz  # noqa: E402
from qviz.demo import load_demo_model, load_digits_split  # noqa: E402

TARGET = 0.05


def qat_model(flow: str, example: torch.Tensor) -> nn.Module:
    model = load_demo_model().train()
    if flow == "fx":
        return prepare_qat_fx(model, tq.get_default_qat_qconfig_mapping("x86"), (example,))
    model.qconfig = tq.get_default_qat_qconfig("x86")
    tq.fuse_modules_qat(model, model.fusion_groups(), inplace=True)
    return tq.prepare_qat(model, inplace=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flow", choices=["fx", "eager"], default="fx")
    parser.add_argument("--steps", type=int, default=1000, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 on a loaded 2-core box thrash)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = load_digits_split()["train"]
    plain = qat_model(args.flow, x[: args.batch])
    watched = copy.deepcopy(plain)
    loops = {}
    for name, model in (("plain", plain), ("watched", watched)):
        loops[name] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    times: dict[str, list[float]] = {"plain": [], "watched": []}

    def step(name: str, i: int, rec) -> None:
        model, opt = loops[name]
        j = (i * args.batch) % (len(x) - args.batch)
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x[j : j + args.batch]), y[j : j + args.batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
        value = loss.item()
        if rec is not None:
            rec.log(loss=value)
        if i >= args.warmup:
            times[name].append(time.perf_counter() - t0)

    with qviz.watch(watched, every=10, histograms_every=100) as rec:
        for i in range(args.warmup + args.steps):
            order = ("plain", "watched") if i % 2 else ("watched", "plain")
            for name in order:
                step(name, i, rec if name == "watched" else None)
    tl = rec.timeline()
    plain_s, watched_s = sum(times["plain"]), sum(times["watched"])
    ratio = watched_s / plain_s
    print(f"torch {torch.__version__}, {args.flow} QAT demo model, batch {args.batch}, "
          f"{args.threads} thread(s), {args.steps} timed steps each (+{args.warmup} warm-up)")
    print(f"recorded: {len(tl.arrays['steps'])} snapshots, {len(tl.arrays['hist_steps'])} histogram steps, "
          f"{len(tl.points)} points, {rec.nbytes() / 2**20:.2f} MiB")
    for name in ("plain", "watched"):
        t = times[name]
        print(f"{name:8s} mean {1e3 * sum(t) / len(t):7.3f} ms/step   median {1e3 * statistics.median(t):7.3f} ms/step")
    print(f"ratio watched/plain = {ratio:.4f}  (overhead {100 * (ratio - 1):+.2f}%, target < {100 * TARGET:.0f}%)")
    print("PASS" if ratio - 1 < TARGET else "FAIL")


if __name__ == "__main__":
    main()
