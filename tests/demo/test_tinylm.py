"""The TinyLM demo: the shipped weights load, predict held-out standard-library text far better
than uniform guessing (perplexity checked against a plain-torch computation), run through
torchao's int8 flow with a perplexity-ranked sweep checked against torchao's own quantize_ on
one layer, through the CLI in a subprocess, and leave the float model as it was."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pytest
import torch

import qviz
from qviz.analysis.language import Perplexity, perplexity
from qviz.demo import tinylm
from qviz.demo.train_tinylm import train
from tests.helpers import assert_unchanged, model_snapshot

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

ROOT = Path(__file__).resolve().parents[2]
#: Held-out perplexity per byte of the shipped weights is 6.30 (python -m qviz.demo.train_tinylm
#: printed it; uniform guessing: 256); this bound leaves a margin for other Python versions' text.
MAX_PERPLEXITY = 8.0


@pytest.fixture(scope="module")
def model():
    return tinylm.load_tinylm()


@pytest.fixture(scope="module")
def run(model):
    """A torchao int8 session on the shipped model (one evaluation batch) and its snapshot before."""
    before = model_snapshot(model)
    evals = tinylm.eval_batches(1)
    session = qviz.Session(model, tinylm.calibration_batches(2), flow=tinylm.DEFAULT_FLOW, eval_data=evals,
                           progress=False).run()
    return session, evals, before


def _plain_perplexity(model, batches) -> float:
    """exp(mean next-byte NLL), by hand: log-softmax of the logits, the target's entry, mean."""
    nll = []
    with torch.no_grad():
        for ids in batches:
            logp = torch.log_softmax(model(ids).double(), dim=-1)[:, :-1]
            nll.append(-logp.gather(-1, ids[:, 1:, None]).squeeze(-1).flatten())
    return math.exp(float(torch.cat(nll).mean()))


def test_the_shipped_weights_load_and_ship_in_the_package(model):
    assert isinstance(model, tinylm.TinyLM) and not model.training
    assert tinylm.WEIGHTS_PATH.stat().st_size < 2 * 2**20
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6 * len(model.blocks) + 1 and linears[-1] == "head"
    with np.load(tinylm.WEIGHTS_PATH, allow_pickle=False) as arrays:  # no pickle: plain arrays
        assert {k for k in arrays.files if not k.startswith("config.")} == set(model.state_dict())
    listed = re.search(r'^"qviz\.demo" = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M)[1]
    assert any(fnmatch(tinylm.WEIGHTS_PATH.name, p.strip(' "')) for p in listed.split(","))
    with pytest.raises(tinylm.TinyLMWeightsMissingError, match="train_tinylm"):
        tinylm.load_tinylm(ROOT / "no-such.npz")


def test_the_held_out_text_is_never_trained_on():
    held, trained = tinylm.held_out_text(), tinylm.train_text()
    files = sorted(tinylm.stdlib_dir().glob("*.py"))
    assert len(held) == sum(p.stat().st_size for p in files if p.name in tinylm.HELD_OUT) + len(tinylm.HELD_OUT) - 1
    assert len(trained) == sum(p.stat().st_size for p in files if p.name not in tinylm.HELD_OUT) + len(files) - len(tinylm.HELD_OUT) - 1
    window = bytes(tinylm.eval_batches(1)[0][0].to(torch.uint8).tolist())
    assert window in (tinylm.stdlib_dir() / tinylm.HELD_OUT[0]).read_bytes()


def test_held_out_perplexity_is_far_below_uniform_and_matches_plain_torch(model):
    batches = tinylm.eval_batches()
    ppl = perplexity(model, batches)
    assert ppl == pytest.approx(_plain_perplexity(model, batches), rel=1e-9)
    assert ppl < MAX_PERPLEXITY < tinylm.VOCAB / 30  # uniform guessing over bytes: 256
    assert _plain_perplexity(tinylm.TinyLM(), batches) > 100  # untrained weights: near uniform


def test_training_is_seeded():
    a, b = train(steps=2, batch_size=2, seed=3), train(steps=2, batch_size=2, seed=3)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not torch.equal(a.head.weight, train(steps=2, batch_size=2, seed=4).head.weight)


def test_the_sweep_ranks_layers_by_the_perplexity_they_cost(run, model):
    session, evals, before = run
    assert tinylm.DEFAULT_FLOW == "torchao"
    table = session.to_dataframe()
    assert table.loc["blocks.0.q_proj", "dtype"] == "int8 (dynamic)" and table.loc["embed", "dtype"] == "float"
    found = session.sensitivity(eval_fn=Perplexity(evals), variants=("quantize_only",)).to_dataframe()
    assert found.attrs["metric"] == "neg_perplexity" and found["sensitivity"].is_monotonic_decreasing
    assert found.loc["head", "float_metric"] == pytest.approx(-_plain_perplexity(model, evals), rel=1e-9)
    # torchao's own quantize_ on a copy with only the most sensitive layer quantized
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, PerRow, quantize_

    layer = found.index[0]
    mine = copy.deepcopy(model)
    quantize_(mine, Int8DynamicActivationInt8WeightConfig(granularity=[PerRow(), PerRow()]),
              filter_fn=lambda m, fqn: fqn == layer)
    assert found.loc[layer, "quantize_only"] == pytest.approx(-_plain_perplexity(mine, evals), rel=1e-6)
    assert found.loc[layer, "sensitivity"] > 0
    assert_unchanged(model, before)


def test_the_cli_demo_prints_float_and_quantized_perplexity(model):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "qviz.cli", "demo", "--model", "tinylm"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "blocks.0.q_proj" in done.stdout and "head" in done.stdout
    found = re.search(r"float (\d+\.\d+), quantized (\d+\.\d+) \(([+-]\d+\.\d+); uniform guessing: 256\)",
                      done.stdout)
    assert found, done.stdout
    assert float(found[1]) == pytest.approx(_plain_perplexity(model, tinylm.eval_batches()), abs=5e-4)
    assert abs(float(found[2]) - float(found[1])) < 0.05  # int8 costs little (measured: +0.002)


def test_serve_is_wired_to_the_demo(monkeypatch):
    from qviz.cli import build_parser
    from qviz.demo import session_factory

    assert build_parser().parse_args(["serve", "--demo", "tinylm"]).demo == "tinylm"
    made = []
    monkeypatch.setattr(tinylm, "tinylm_session", lambda **k: made.append(k) or "session")
    assert session_factory(demo="tinylm")() == "session" and made == [{"progress": False}]
    monkeypatch.setattr(tinylm, "WEIGHTS_PATH", ROOT / "no-such.npz")
    with pytest.raises(tinylm.TinyLMWeightsMissingError):
        session_factory(demo="tinylm")  # `qviz serve --demo tinylm` fails before serving
