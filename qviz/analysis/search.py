"""Mixed-precision search: the smallest plan that meets an accuracy target.

Model, solve, verify, as the best mixed-precision tools do:

1. *Probe*: each layer alone at each rung of the ladder below float (every other layer float) is
   converted and measured: its cost is the noise it adds, as a fraction of the output's power
   (``target_sqnr``), or the drop of the user's metric (``eval_fn``).
2. *Solve*: costs add up (independent errors add in noise power), so the best plans of the model
   are the Pareto front of (weight bytes, predicted cost) over every assignment of rungs. It is
   found exactly: by enumeration when there are few plans, else by a dynamic programme over the
   layers that keeps only the non-dominated partial plans (a multiple-choice knapsack).
3. *Verify*: candidates are converted for real (``Session.apply``, no calibration pass) from the
   smallest one the model predicts within 3 dB of the target up; every measurement rescales the
   model by how wrong it was, and the walk ends at the first plan that meets the target.

The plan returned is the smallest plan *verified* to meet the target (probes and the plan in
force count), so it is never larger than any plan the search measured meeting it. The pairwise
interaction of the most sensitive layers (the additive model's error) is measured and returned.
Sizes count weight storage at the dtype's width (int4 as 4 bits, as int4 kernels store it), and
for torchao's number formats their shared scales too: mxfp8/mxfp4 one 8-bit scale per 32 weights
(8.25 and 4.25 bits per weight), nvfp4 one 8-bit scale per 16 (4.5 bits) plus a float32 scale per
tensor (see :mod:`qviz.flows.torchao.formats`). Ladders may mix them: ``("mxfp4", "nvfp4", "float8_e4m3fn",
"int8", "float")`` on a torchao session; a rung the session's flow runs on no layer is refused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from qviz.errors import ConfigError
from qviz.flows.registry import flow_class, flow_names
from qviz.flows.torchao.formats import BITS as FORMAT_BITS
from qviz.flows.torchao.formats import TENSOR_BYTES
from qviz.options import SEARCH_LADDER

BITS = {"int4": 4, "int8": 8, "fp16": 16, "float": 32, **FORMAT_BITS}
MARGIN = 2.0  # verify candidates predicted up to 3 dB (a factor 2 in noise) past the target
ENUMERATE_UP_TO = 512  # plans: below this every plan is a candidate, not only the Pareto front
FRONT_LIMIT = 20_000  # partial plans kept by the dynamic programme before thinning


@dataclass(frozen=True)
class SearchResult:
    """The plan found (``None`` when no candidate met the target), every candidate measured, and
    the measured pairwise interactions of the most sensitive layers."""

    plan: object
    candidates: pd.DataFrame  # step, phase, changed, weight_bytes, output_sqnr, metric, predicted, ...
    interactions: pd.DataFrame = field(default_factory=pd.DataFrame)

    def pareto(self) -> pd.DataFrame:
        """Candidates no other candidate beats on both size and error (the Pareto front)."""
        df = self.candidates.sort_values(["weight_bytes", "metric"], ascending=[True, False])
        best, keep = -math.inf, []
        for i, row in df.iterrows():
            if row.metric > best:
                keep.append(i)
                best = row.metric
        return df.loc[keep]


def weight_bytes(param_counts: dict[str, int], plan, float_layers=()) -> int:
    """Bytes of weight storage of ``plan``'s layers at their dtypes' widths (``plan`` None, or a
    layer in ``float_layers``: 32-bit float). qviz's one size figure: the header, the search,
    the Pareto axis, the compare tab and the report all show it, so a QAT and a PTQ session of
    one model agree and an int4 layer counts half an int8 one whatever the flow stores (block
    formats count their scales: see :func:`layer_bytes`)."""
    def dtype(layer: str) -> str:
        return "float" if plan is None or layer in float_layers else plan[layer].dtype

    return int(sum(layer_bytes(n, dtype(layer)) for layer, n in param_counts.items()))


def layer_bytes(n: int, dtype: str) -> float:
    """Bytes of one layer's ``n`` weights at ``dtype``: ``n * BITS / 8`` plus any per-tensor scale."""
    return n * BITS[dtype] / 8 + TENSOR_BYTES.get(dtype, 0)


class _Objective:
    """The target as a cost to keep under a budget: relative noise power, or the metric's drop."""

    def __init__(self, session, target_sqnr, eval_fn, max_drop):
        self.session, self.target_sqnr, self.eval_fn = session, target_sqnr, eval_fn
        if eval_fn is None:
            self.budget = 10 ** (-target_sqnr / 10)
        else:
            self.baseline = float(eval_fn(session.float_model()))
            self.budget = float(max_drop)

    def metric(self) -> float:
        """The figure the target is on, for the plan in force (dB, or the metric's change)."""
        if self.eval_fn is None:
            return float(self.session.summary()["output_sqnr"])
        return float(self.eval_fn(self.session.quantized_model())) - self.baseline

    def cost(self, metric: float) -> float:
        if math.isnan(metric):
            return math.inf  # a plan whose figure is not a number meets nothing
        if self.eval_fn is None:
            return 0.0 if metric == math.inf else 10 ** (-metric / 10)
        return max(-metric, 0.0)

    def predicted_metric(self, cost: float) -> float:
        if self.eval_fn is None:
            return math.inf if cost <= 0 else -10 * math.log10(cost)
        return -cost

    def meets(self, metric: float) -> bool:
        return self.cost(metric) <= self.budget * (1 + 1e-9)


def search(session, *, target_sqnr: float | None = None, eval_fn=None, max_drop: float | None = None,
           ladder: tuple[str, ...] = SEARCH_LADDER, callback=None, max_verify: int = 24,
           interactions: int = 3) -> SearchResult:
    """Find a plan meeting ``target_sqnr`` (model output SQNR, dB) or a ``max_drop`` of
    ``eval_fn(model)`` (higher is better) against the float model, at the least size (see the
    module docstring). ``callback(tried, most)`` is called after each conversion (``most``: the
    most there can be); ``max_verify`` bounds the verified candidates, ``interactions`` the
    layers whose pairs are measured."""
    if (target_sqnr is None) == (eval_fn is None):
        raise ConfigError("give exactly one target: target_sqnr=30 (dB), or eval_fn=... with max_drop=...")
    if eval_fn is not None and max_drop is None:
        raise ConfigError("eval_fn needs max_drop: the largest acceptable drop of its value vs the float model")
    unknown = [d for d in ladder if d not in BITS]
    if unknown or len(ladder) < 2 or ladder[-1] != "float":
        raise ConfigError(f"ladder must list at least two of {list(BITS)} from cheap to precise, ending "
                          f"with 'float', got {ladder}")
    objective = _Objective(session, target_sqnr, eval_fn, max_drop)
    start = session.plan
    counts = session.param_counts()
    stuck = set(session.summary().get("left_float", []))  # layers the flow cannot quantize
    layers = [n for n in start if n not in stuck]
    rungs = ladder[:-1]
    _check_rungs(session, layers, rungs)
    pairs = list(itertools.combinations(range(min(interactions, len(layers))), 2))
    most = 1 + len(layers) * len(rungs) + len(pairs) + max_verify
    walk = _Walk(session, objective, counts, callback, most)
    all_float = start.with_changes({n: {"dtype": "float"} for n in layers})
    try:
        walk.measure(start, "start", "the plan in force")
        costs = _probe(walk, all_float, layers, rungs)
        inter = _interactions(walk, all_float, layers, rungs, costs, pairs)
        fixed = sum(layer_bytes(counts[n], "float") for n in counts if n not in layers)
        front = _candidates(layers, ladder, costs, {n: counts[n] for n in layers}, fixed)
        _verify(walk, all_float, layers, ladder, front, objective, max_verify)
    finally:
        session.apply(start)
    if callback is not None:  # done: fewer conversions than the most there could have been
        callback(len(walk.rows), len(walk.rows))
    return SearchResult(walk.best(), pd.DataFrame(walk.rows), inter)


def _check_rungs(session, layers, rungs) -> None:
    """Refuse a rung the session's flow runs on none of the layers (checked as apply() checks a
    plan, without converting): its probes would all be refused and the search silently skip it."""
    refused = [d for d in rungs if layers and not any(session.choices(n, "dtype", (d,)) for n in layers)]
    if refused:
        formats = [d for d in refused if d in FORMAT_BITS]
        flows = [n for n in flow_names() if all(d in (flow_class(n).editable or {}).get("dtype", ()) for d in formats)]
        hint = (f"; the number format(s) {_names(formats)} need Session(..., flow={' or '.join(map(repr, flows))})"
                if formats and flows and session.flow.name not in flows else
                "; session.choices(layer, 'dtype', ladder) says what each layer takes")
        raise ConfigError(f"ladder rung(s) {_names(refused)} run on no layer of this session (flow "
                          f"{session.flow.name!r}): leave them out of the ladder{hint}")


def _names(values) -> str:
    return ", ".join(map(repr, values))


class _Walk:
    """Converts and measures plans, keeping one row per candidate."""

    def __init__(self, session, objective, counts, callback, most):
        self.session, self.objective, self.counts = session, objective, counts
        self.callback, self.most, self.rows, self.plans = callback, most, [], []

    def measure(self, plan, phase: str, changed: str, predicted: float = math.nan) -> float:
        if plan != self.session.plan:
            self.session.apply(plan)
        metric = self.objective.metric()
        self.rows.append({"step": len(self.rows), "phase": phase, "changed": changed,
                          "weight_bytes": weight_bytes(self.counts, plan),
                          "output_sqnr": self.session.summary()["output_sqnr"], "metric": metric,
                          "predicted": predicted, "meets_target": self.objective.meets(metric),
                          "plan": plan.to_json()})
        self.plans.append(plan)
        if self.callback is not None:
            self.callback(len(self.rows), self.most)
        return metric

    def smallest_meeting(self) -> int | None:
        meeting = [r["weight_bytes"] for r in self.rows if r["meets_target"]]
        return min(meeting) if meeting else None

    def best(self):
        size = self.smallest_meeting()
        if size is None:
            return None
        i = min(i for i, r in enumerate(self.rows) if r["meets_target"] and r["weight_bytes"] == size)
        return self.plans[i]


def _probe(walk: _Walk, all_float, layers, rungs) -> dict[tuple[str, str], float]:
    """The cost of each layer alone at each rung (inf where the flow refuses the rung)."""
    costs = {}
    for layer in layers:
        for dtype in rungs:
            plan = all_float.with_changes({layer: {"dtype": dtype}})
            try:
                metric = walk.measure(plan, "probe", f"{layer} alone at {dtype}")
            except ConfigError:  # e.g. int4 for a layer type the backend has no int4 kernel for
                costs[(layer, dtype)] = math.inf
                continue
            costs[(layer, dtype)] = walk.objective.cost(metric)
    return costs


def _interactions(walk, all_float, layers, rungs, costs, pairs) -> pd.DataFrame:
    """Measured vs additive cost of pairs of the most sensitive layers at their cheapest rung."""
    cheap = rungs[0]
    ranked = sorted(layers, key=lambda n: -costs[(n, cheap)] if math.isfinite(costs[(n, cheap)]) else 0)
    rows = []
    for i, j in pairs:
        a, b = ranked[i], ranked[j]
        if not (math.isfinite(costs[(a, cheap)]) and math.isfinite(costs[(b, cheap)])):
            continue
        predicted = walk.objective.predicted_metric(costs[(a, cheap)] + costs[(b, cheap)])
        plan = all_float.with_changes({a: {"dtype": cheap}, b: {"dtype": cheap}})
        measured = walk.measure(plan, "pair", f"{a} and {b} at {cheap}", predicted)
        rows.append({"layer_a": a, "layer_b": b, "dtype": cheap, "predicted": predicted,
                     "measured": measured, "error": measured - predicted})
    return pd.DataFrame(rows, columns=["layer_a", "layer_b", "dtype", "predicted", "measured", "error"])


def _candidates(layers, ladder, costs, counts, fixed: float) -> list[tuple[float, float, tuple[int, ...]]]:
    """(weight bytes, predicted cost, rung per layer) of the plans worth verifying, smallest first:
    every plan when there are few, else the exact Pareto front of the additive model. ``fixed``:
    the bytes of the layers the search leaves float."""
    options = [[(layer_bytes(counts[n], d), 0.0 if d == "float" else costs[(n, d)], k)
                for k, d in enumerate(ladder) if d == "float" or math.isfinite(costs[(n, d)])]
               for n in layers]
    if math.prod(len(o) for o in options) <= ENUMERATE_UP_TO:
        plans = [(fixed + sum(o[0] for o in combo), sum(o[1] for o in combo), tuple(o[2] for o in combo))
                 for combo in itertools.product(*options)]
        return sorted(plans)
    front: list[tuple[float, float, tuple[int, ...]]] = [(fixed, 0.0, ())]
    for opts in options:
        merged = sorted((b + ob, c + oc, assign + (k,)) for b, c, assign in front for ob, oc, k in opts)
        front, lowest = [], math.inf
        for point in merged:
            if point[1] < lowest:  # not dominated by a smaller plan
                front.append(point)
                lowest = point[1]
        if len(front) > FRONT_LIMIT:  # thin evenly in cost (exact below the limit)
            front = front[:: math.ceil(len(front) / FRONT_LIMIT)] + [front[-1]]
    return front


def _verify(walk, all_float, layers, ladder, candidates, objective, max_verify) -> None:
    """Convert candidates smallest first, within the (corrected) model's margin of the target,
    until one meets it or none smaller than the best verified plan is left."""
    ratios: list[float] = []  # measured cost / predicted cost of each verified candidate
    tried: set[tuple[int, ...]] = set()
    for _ in range(max_verify):
        scale = math.exp(np.mean(np.log(ratios))) if ratios else 1.0
        bound = walk.smallest_meeting()
        pick = next((c for c in candidates if c[2] not in tried and (bound is None or c[0] < bound)
                     and c[1] * scale <= objective.budget * MARGIN), None)
        if pick is None:
            return
        size, cost, assign = pick
        tried.add(assign)
        plan = all_float.with_changes({n: {"dtype": ladder[k]} for n, k in zip(layers, assign, strict=True)
                                       if ladder[k] != "float"})
        changed = ", ".join(f"{n}:{ladder[k]}" for n, k in zip(layers, assign, strict=True) if ladder[k] != "float")
        metric = walk.measure(plan, "verify", changed or "all float", objective.predicted_metric(cost))
        if objective.meets(metric):
            continue  # the bound now excludes every larger candidate
        measured = objective.cost(metric)
        if cost > 0 and measured > 0 and math.isfinite(measured):
            ratios.append(measured / cost)
