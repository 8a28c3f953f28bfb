"""Mixed-precision search quality: qviz's search vs brute force and vs a much longer search.

1. A 4-conv CNN (4 convs + fc, FX, 3**5 = 243 plans): every plan is converted and measured (brute
   force); qviz's plan must be the smallest plan meeting the target. The greedy search qviz had
   before (raise the layer with the worst local SQNR one rung at a time) is shown beside it.
2. Three transformer blocks (12 linears, torchao, 3**12 plans, too many to enumerate): qviz's plan
   vs the smallest plan a randomised local search finds with many more real conversions.

Prints weight bytes, the ratio to the best known plan, and the conversions each search used.
Run: ``python bench/search.py`` (``--quick`` for fewer targets and a shorter long search).
"""

from __future__ import annotations

import argparse
import itertools
import random

import torch
from common import quiet_warnings, timed
from torch import nn

import qviz
from qviz.analysis.search import weight_bytes
from qviz.models import transformer_block

LADDER = ("int4", "int8", "float")


class FourConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.c3, self.c4 = nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        for conv in (self.c1, self.c2, self.c3, self.c4):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


class Blocks(nn.Module):
    def __init__(self, n: int = 3):
        super().__init__()
        self.blocks = nn.Sequential(*[transformer_block() for _ in range(n)])

    def forward(self, x):
        return self.blocks(x)


def data(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def measure(session, plan) -> float:
    session.apply(plan)
    return session.summary()["output_sqnr"]


def greedy(session, target) -> tuple[int, int]:
    """The search qviz had before: all int4, then raise the worst local-SQNR layer one rung."""
    start, counts = session.plan, session.param_counts()
    rung = dict.fromkeys(start, 0)
    plan, tries = start.with_changes({n: {"dtype": LADDER[0]} for n in rung}), 0
    try:
        while True:
            tries += 1
            if measure(session, plan) >= target:
                return weight_bytes(counts, plan), tries
            frame = session.to_dataframe()
            open_layers = [n for n in rung if rung[n] < len(LADDER) - 1]
            worst = min(open_layers, key=lambda n: frame.loc[n, "local_sqnr"])
            rung[worst] += 1
            plan = plan.with_changes({worst: {"dtype": LADDER[rung[worst]]}})
    finally:
        session.apply(start)


def brute_force(session) -> list[tuple[int, float]]:
    start, counts, layers = session.plan, session.param_counts(), list(session.plan)
    try:
        return [(weight_bytes(counts, p), measure(session, p)) for p in
                (start.with_changes(dict(zip(layers, ({"dtype": d} for d in ds), strict=True)))
                 for ds in itertools.product(LADDER, repeat=len(layers)))]
    finally:
        session.apply(start)


def local_search(session, target, evaluations: int, seed: int = 0) -> int:
    """Randomised descent with restarts: lower a random layer a rung while the target holds."""
    rng, start, counts, layers = random.Random(seed), session.plan, session.param_counts(), list(session.plan)
    best = weight_bytes(counts, start.with_changes({n: {"dtype": "float"} for n in layers}))
    used = 0
    try:
        while used < evaluations:
            rung = dict.fromkeys(layers, 2)
            stuck = set()
            while used < evaluations and len(stuck) < len(layers):
                layer = rng.choice([n for n in layers if n not in stuck])
                if rung[layer] == 0:
                    stuck.add(layer)
                    continue
                trial = dict(rung, **{layer: rung[layer] - 1})
                plan = start.with_changes({n: {"dtype": LADDER[k]} for n, k in trial.items()})
                used += 1
                if measure(session, plan) >= target:
                    rung = trial
                    best = min(best, weight_bytes(counts, plan))
                else:
                    stuck.add(layer)
    finally:
        session.apply(start)
    return best


def search(session, target) -> tuple[int, int, float]:
    result, wall, _ = timed(lambda: session.search(target_sqnr=target))
    return weight_bytes(session.param_counts(), result.plan), len(result.candidates), wall


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quiet_warnings()
    torch.manual_seed(0)
    cnn = qviz.Session(FourConv().eval(), data((8, 3, 16, 16), 2, 1), eval_data=data((16, 3, 16, 16), 1, 2),
                       progress=False).run()
    print(f"1. 4-conv CNN (FX, {len(cnn.plan)} layers, {3 ** len(cnn.plan)} plans): brute force ...", flush=True)
    brute, wall, _ = timed(lambda: brute_force(cnn))
    print(f"   brute force: {len(brute)} conversions in {wall:.1f} s")
    print("   target   best(brute)   qviz (ratio, conversions)   greedy before (ratio, conversions)")
    for target in (25.0, 35.0) if args.quick else (25.0, 30.0, 35.0, 40.0):
        best = min(s for s, q in brute if q >= target)
        size, tries, _ = search(cnn, target)
        old, old_tries = greedy(cnn, target)
        print(f"   {target:5.1f} dB  {best:9,d} B   {size:9,d} B ({size / best:.3f}x, {tries})"
              f"        {old:9,d} B ({old / best:.3f}x, {old_tries})")

    torch.manual_seed(0)
    calib, evals = data((4, 8, 64), 2, 1), data((4, 8, 64), 1, 2)
    blocks = qviz.Session(Blocks().eval(), calib, eval_data=evals, flow="torchao", scheme="int8_weight_only",
                          progress=False).run()
    n = len(blocks.plan)
    evaluations = 150 if args.quick else 600
    print(f"2. 3 transformer blocks (torchao, {n} linears, {3 ** n:,} plans); long search: {evaluations} conversions")
    print("   target   long search   qviz (ratio, conversions, s)")
    for target in (32.0, 40.0) if args.quick else (30.0, 35.0, 40.0, 45.0):
        long = local_search(blocks, target, evaluations)
        size, tries, wall = search(blocks, target)
        print(f"   {target:5.1f} dB  {long:9,d} B   {size:9,d} B ({size / long:.3f}x, {tries}, {wall:.1f} s)",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
