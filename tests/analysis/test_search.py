"""Mixed-precision search against brute force: the smallest plan meeting the target, always."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import qviz
from qviz.analysis import search as search_module
from qviz.analysis.search import BITS, weight_bytes

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # unequal sensitivities: an outlier-heavy layer and a smooth one
        model[2].weight[:, :4] *= 8
        model[4].weight.mul_(0.5)
    return model


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


def _data(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def mlp_session():
    pytest.importorskip("torchao")
    return qviz.Session(_mlp(), _data((16, 32), 2, 1), eval_data=_data((32, 32), 1, 2), flow="torchao",
                        scheme="int8_weight_only", progress=False).run()


@pytest.fixture(scope="module")
def cnn_session():
    torch.manual_seed(0)
    return qviz.Session(_CNN().eval(), _data((4, 3, 12, 12), 2, 1), eval_data=_data((8, 3, 12, 12), 1, 2),
                        progress=False).run()


def _brute_force(session, ladder=("int4", "int8", "float")) -> list[tuple[float, float]]:
    """(weight bytes, output SQNR) of every plan, each converted and measured."""
    start, counts, layers = session.plan, session.param_counts(), list(session.plan)
    out = []
    try:
        for dtypes in itertools.product(ladder, repeat=len(layers)):
            plan = start.with_changes({n: {"dtype": d} for n, d in zip(layers, dtypes, strict=True)})
            session.apply(plan)
            out.append((weight_bytes(counts, plan), session.summary()["output_sqnr"]))
    finally:
        session.apply(start)
    return out


@pytest.fixture(scope="module")
def mlp_brute(mlp_session):
    return _brute_force(mlp_session)


@pytest.mark.slow
@pytest.mark.parametrize("target", [18.0, 24.0, 28.0, 33.0, 38.0])
def test_search_finds_the_smallest_plan_brute_force_finds(mlp_session, mlp_brute, target):
    start = mlp_session.plan
    result = mlp_session.search(target_sqnr=target)
    best = min(size for size, sqnr in mlp_brute if sqnr >= target)
    assert result.plan is not None
    assert weight_bytes(mlp_session.param_counts(), result.plan) == best
    assert mlp_session.plan == start  # the session is left on its plan
    mlp_session.apply(result.plan)
    try:
        assert mlp_session.summary()["output_sqnr"] >= target
    finally:
        mlp_session.apply(start)


@pytest.mark.slow
def test_search_on_fx_convs_matches_brute_force(cnn_session):
    brute = _brute_force(cnn_session)
    for target in (22.0, 30.0):
        result = cnn_session.search(target_sqnr=target)
        assert weight_bytes(cnn_session.param_counts(), result.plan) == min(s for s, q in brute if q >= target)


def test_never_returns_more_than_a_verified_plan(mlp_session):
    result = mlp_session.search(target_sqnr=28.0)
    c = result.candidates
    assert set(c.phase) >= {"start", "probe", "verify"}
    meeting = c[c.meets_target]
    assert weight_bytes(mlp_session.param_counts(), result.plan) == meeting.weight_bytes.min()
    chosen = meeting.loc[meeting.weight_bytes.idxmin()]
    assert qviz.Plan.from_json(chosen.plan) == result.plan
    assert (c.loc[c.phase == "verify", "predicted"].notna()).all()
    assert not result.pareto().empty


def test_unreachable_target_finds_nothing(mlp_session):
    result = mlp_session.search(target_sqnr=400.0)  # even all float is exact: inf dB meets it
    assert result.plan is not None and all(c.dtype == "float" for _, c in result.plan.items())
    result = mlp_session.search(eval_fn=lambda m: -1e9 if m is not mlp_session.float_model() else 0.0,
                                max_drop=1.0)
    assert result.plan is None  # every quantized model scores far below the float one


def test_interactions_are_the_measured_pairs(mlp_session):
    result = mlp_session.search(target_sqnr=28.0)
    inter, c = result.interactions, result.candidates
    assert len(inter) == 3  # the three most sensitive layers, pairwise
    probes = c[c.phase == "probe"].set_index("changed")
    pairs = c[c.phase == "pair"].reset_index(drop=True)
    for i, row in inter.iterrows():
        a = probes.loc[f"{row.layer_a} alone at int4", "output_sqnr"]
        b = probes.loc[f"{row.layer_b} alone at int4", "output_sqnr"]
        additive = -10 * math.log10(10 ** (-a / 10) + 10 ** (-b / 10))
        assert row.predicted == pytest.approx(additive)
        assert row.measured == pytest.approx(pairs.loc[i, "output_sqnr"])
        assert row.error == pytest.approx(row.measured - row.predicted)


def test_callback_counts_every_conversion(mlp_session):
    calls = []
    result = mlp_session.search(target_sqnr=28.0, callback=lambda tried, most: calls.append((tried, most)))
    assert [t for t, _ in calls[:-1]] == list(range(1, len(result.candidates) + 1))
    assert all(t <= most for t, most in calls) and calls[-1] == (len(result.candidates),) * 2


def test_dynamic_programme_front_equals_enumeration(monkeypatch):
    """The Pareto front of the knapsack solver equals the front of every plan enumerated."""
    g = torch.Generator().manual_seed(0)
    layers = [f"l{i}" for i in range(7)]
    ladder = ("int4", "int8", "float")
    counts = {n: int(torch.randint(100, 5000, (1,), generator=g)) for n in layers}
    costs = {}
    for n in layers:
        c8 = float(torch.rand(1, generator=g)) * 1e-3
        costs[(n, "int8")], costs[(n, "int4")] = c8, c8 * float(10 + 30 * torch.rand(1, generator=g))
    every = search_module._candidates(layers, ladder, costs, counts, 12.0)  # 3**7 > 512: the DP
    plans = [(12.0 + sum(counts[n] * BITS[ladder[k]] / 8 for n, k in zip(layers, a, strict=True)),
              sum(0.0 if ladder[k] == "float" else costs[(n, ladder[k])] for n, k in zip(layers, a, strict=True)), a)
             for a in itertools.product(range(3), repeat=len(layers))]
    plans.sort()
    front, lowest = [], math.inf
    for p in plans:
        if p[1] < lowest:
            front.append(p)
            lowest = p[1]
    assert len(every) == len(front)
    for (s1, c1, _), (s2, c2, _) in zip(every, front, strict=True):
        assert s1 == pytest.approx(s2) and c1 == pytest.approx(c2)
