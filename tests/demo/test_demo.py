"""Tests for the embedded digits demo and the model builders in qviz.models."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch.ao.quantization import fuse_modules

from qviz.demo import (
    WEIGHTS_PATH,
    DemoWeightsMissingError,
    DigitsNet,
    accuracy,
    calibration_batches,
    demo_session_inputs,
    eval_batches,
    eval_labels,
    load_demo_model,
    load_digits_split,
)
from qviz.errors import QvizError
from qviz.models import resnet18, tiny_lstm_classifier, tiny_mlp

# torch.ao.quantization still works in this torch but warns on every use.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
]


def _fused_matches(model: torch.nn.Module, groups, x: torch.Tensor) -> None:
    """Fusing ``groups`` on an eval copy changes no output (beyond float rounding)."""
    model = model.eval()
    fused = fuse_modules(copy.deepcopy(model), groups)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)
    for group in groups:  # every fused group became one module, its other members Identity
        for name in group[1:]:
            assert isinstance(fused.get_submodule(name), torch.nn.Identity), name


def test_weights_file_is_small_and_plain_numpy():
    assert WEIGHTS_PATH.stat().st_size < 100 * 1024
    with np.load(WEIGHTS_PATH, allow_pickle=False) as arrays:
        assert set(arrays.files) == set(DigitsNet().state_dict())
        assert {arrays[k].dtype for k in arrays.files} <= {np.dtype("float32"), np.dtype("int64")}


def test_demo_model_reaches_95_percent_on_test_split():
    model = load_demo_model()
    assert not model.training
    assert accuracy(model) >= 0.95
    assert not model.training  # accuracy() restores the mode


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(DemoWeightsMissingError, match="python -m qviz.demo.train") as info:
        load_demo_model(tmp_path / "nope.npz")
    assert isinstance(info.value, QvizError) and isinstance(info.value, FileNotFoundError)


def test_split_sizes_and_disjointness():
    splits = load_digits_split()
    assert {k: len(v[0]) for k, v in splits.items()} == {"train": 1197, "val": 300, "test": 300}
    for x, y in splits.values():
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and len(y) == len(x)
    x_train, _ = splits["train"]
    assert abs(float(x_train.mean())) < 0.01 and abs(float(x_train.std()) - 1) < 0.01


def test_batches_are_deterministic_and_shaped():
    calib, calib2 = calibration_batches(), calibration_batches()
    assert len(calib) == 4 and all(b.shape == (32, 1, 8, 8) for b in calib)
    assert all(torch.equal(a, b) for a, b in zip(calib, calib2, strict=True))
    ev, ev2 = eval_batches(), eval_batches()
    assert len(ev) == 2 and all(b.shape == (64, 1, 8, 8) for b in ev)
    assert all(torch.equal(a, b) for a, b in zip(ev, ev2, strict=True))
    labels = eval_labels()
    assert [len(y) for y in labels] == [64, 64] and labels[0].dtype == torch.int64
    assert all(torch.equal(a, b) for a, b in zip(labels, eval_labels(), strict=True))
    # eval batches are the head of the test split, in order
    x_test, y_test = load_digits_split()["test"]
    assert torch.equal(torch.cat(ev), x_test[:128]) and torch.equal(torch.cat(labels), y_test[:128])
    assert [b.shape[0] for b in calibration_batches(3, 10)] == [10, 10, 10]
    with pytest.raises(ValueError):
        eval_batches(10, 64)  # more than the 300 test images


def test_accuracy_on_explicit_batches():
    model = load_demo_model()
    assert accuracy(model, zip(eval_batches(), eval_labels(), strict=True)) >= 0.9


def test_demo_session_inputs():
    model, calib, ev = demo_session_inputs()
    assert isinstance(model, DigitsNet) and not model.training
    assert len(calib) == 4 and len(ev) == 2


def test_demo_fusion_groups_fuse_with_equal_outputs():
    model = load_demo_model()
    assert DigitsNet.fusion_groups() == [
        ["stem_conv", "stem_bn", "stem_relu"],
        ["block_conv1", "block_bn1", "block_relu1"],
        ["block_conv2", "block_bn2"],
        ["down_conv", "down_bn", "down_relu"],
        ["fc1", "fc1_relu"],
    ]
    _fused_matches(model, model.fusion_groups(), torch.cat(eval_batches()))


def test_resnet18_shape_params_and_fusion():
    torch.manual_seed(0)
    model = resnet18().eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 11.7e6) <= 0.1e6
    groups = model.fusion_groups()
    assert ["layer2.0.downsample.0", "layer2.0.downsample.1"] in groups
    assert len(groups) == 1 + 8 * 2 + 3
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 1000)
    _fused_matches(model, groups, x)


def test_resnet18_is_deterministic_given_seed():
    torch.manual_seed(1)
    a = resnet18(num_classes=10).state_dict()
    torch.manual_seed(1)
    b = resnet18(num_classes=10).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_mlp_runs_and_fuses():
    torch.manual_seed(0)
    model = tiny_mlp()
    x = torch.randn(5, 16)
    assert model(x).shape == (5, 4)
    _fused_matches(model, model.fusion_groups(), x)


def test_lstm_classifier_runs_float_and_dynamic():
    torch.manual_seed(0)
    model = tiny_lstm_classifier().eval()
    x = torch.randn(3, 7, 8)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 4)
        qmodel = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.LSTM, torch.nn.Linear}, dtype=torch.qint8
        )
        qout = qmodel(x)
    assert qout.shape == (3, 4)
    assert (qout - out).abs().max() < 0.1


def test_cli_demo_prints_warnings_as_one_line_and_the_weight_size(capsys, monkeypatch):
    """`qviz demo`: torch.ao's deprecation as one "qviz: FutureWarning: ..." line (no file:line
    and source echo), and the size as weight bytes at the dtypes' widths, as the screens show it."""
    from qviz import cli
    from qviz.demo import demo_session

    def warning_demo(*args, **kwargs):  # qviz says torch.ao's deprecation once a process: say it here
        warnings.warn("torch.ao.quantization (eager, FX, dynamic) is deprecated", FutureWarning, stacklevel=2)
        return demo_session(*args, **kwargs)

    monkeypatch.setattr(cli, "demo_session", warning_demo)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert "qviz: FutureWarning: torch.ao.quantization" in err
    assert "warnings.warn" not in err and ".py:" not in err
    summary = demo_session(progress=False).summary()
    assert f"weights {summary['weight_bytes'] / 1000:.1f} kB at their dtypes' widths" in out
    param_bytes = sum(p.numel() for n, p in load_demo_model().named_parameters() if "bn" not in n)
    assert summary["float_weight_bytes"] == pytest.approx(4 * param_bytes, rel=0.02)  # BN folded in
    assert summary["weight_bytes"] == summary["float_weight_bytes"] // 4  # every layer int8
