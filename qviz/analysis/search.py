"""Mixed-precision search: the smallest plan that meets an accuracy target.

Greedy and verified: start with every layer at the cheapest dtype of the ladder, convert, and
while the target is missed raise the layer with the worst ``local_sqnr`` (its own error, as
recorded by the last real conversion) one rung up the ladder. Every step is a real
``Session.apply`` (no calibration pass), so each candidate's figures are measured, not predicted.
Sizes count weight storage at the dtype's width (int4 as 4 bits, as int4 kernels store it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from qviz.errors import ConfigError

BITS = {"int4": 4, "int8": 8, "fp16": 16, "float": 32}


@dataclass(frozen=True)
class SearchResult:
    """The plan found (``None`` when no candidate met the target) and every candidate tried."""

    plan: object
    candidates: pd.DataFrame  # step, changed, weight_bytes, output_sqnr, metric, meets_target

    def pareto(self) -> pd.DataFrame:
        """Candidates no other candidate beats on both size and error (the Pareto front)."""
        df = self.candidates.sort_values(["weight_bytes", "metric"], ascending=[True, False])
        best, keep = -math.inf, []
        for i, row in df.iterrows():
            if row.metric > best:
                keep.append(i)
                best = row.metric
        return df.loc[keep]


def weight_bytes(param_counts: dict[str, int], plan) -> int:
    """Bytes of weight storage of ``plan``'s layers at their dtypes' widths."""
    return int(sum(n * BITS[plan[layer].dtype] / 8 for layer, n in param_counts.items()))


def search(session, *, target_sqnr: float | None = None, eval_fn=None, max_drop: float | None = None,
           ladder: tuple[str, ...] = ("int4", "int8", "float"), callback=None) -> SearchResult:
    """Find a plan meeting ``target_sqnr`` (model output SQNR, dB) or a ``max_drop`` of
    ``eval_fn(model)`` (higher is better) against the float model, at the least size.
    ``callback(tried, most)`` is called after each candidate (``most``: the most there can be)."""
    if (target_sqnr is None) == (eval_fn is None):
        raise ConfigError("give exactly one target: target_sqnr=30 (dB), or eval_fn=... with max_drop=...")
    if eval_fn is not None and max_drop is None:
        raise ConfigError("eval_fn needs max_drop: the largest acceptable drop of its value vs the float model")
    unknown = [d for d in ladder if d not in BITS]
    if unknown or len(ladder) < 2:
        raise ConfigError(f"ladder must list at least two of {list(BITS)} from cheap to precise, got {ladder}")
    if eval_fn is not None:
        baseline = float(eval_fn(session.float_model()))

    def measure() -> float:
        if eval_fn is None:
            return session.summary()["output_sqnr"]
        return float(eval_fn(session.quantized_model())) - baseline

    def meets(value: float) -> bool:
        return value >= target_sqnr if eval_fn is None else value >= -max_drop

    start = session.plan
    counts = session.param_counts()
    stuck = set(session.summary().get("left_float", []))  # layers the flow cannot quantize
    rung = {n: 0 for n in start if n not in stuck}
    plan = start.with_changes({n: {"dtype": ladder[0]} for n in rung})
    rows, found = [], None
    most = 1 + len(rung) * (len(ladder) - 1)
    try:
        changed = "all layers"
        while True:
            session.apply(plan)
            value = measure()
            rows.append({"step": len(rows), "changed": changed, "weight_bytes": weight_bytes(counts, plan),
                         "output_sqnr": session.summary()["output_sqnr"], "metric": value,
                         "meets_target": meets(value), "plan": plan.to_json()})
            if callback is not None:
                callback(len(rows), most)
            if meets(value):
                found = plan
                break
            frame = session.to_dataframe()
            open_layers = [n for n in rung if rung[n] < len(ladder) - 1]
            if not open_layers:
                break
            worst = min(open_layers, key=lambda n: _badness(frame, n))
            rung[worst] += 1
            plan = plan.with_changes({worst: {"dtype": ladder[rung[worst]]}})
            changed = f"{worst} -> {ladder[rung[worst]]}"
    finally:
        session.apply(start)
    return SearchResult(found, pd.DataFrame(rows))


def _badness(frame: pd.DataFrame, layer: str) -> float:
    """Lower is worse: the layer's own error; float layers have none."""
    value = frame.loc[layer, "local_sqnr"] if layer in frame.index else math.inf
    return math.inf if pd.isna(value) else float(value)
