"""The embedded demo: a small CNN on scikit-learn's digits with shipped weights, no download.

``load_demo_model()`` gives the trained float model; ``demo_session_inputs()`` gives it with
calibration and evaluation batches, ready for a qviz session; ``demo_session()`` runs that session
(what ``qviz demo`` prints and ``qviz serve --demo`` serves). Retrain with
``python -m qviz.demo.train``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from qviz.demo.data import (
    accuracy,
    calibration_batches,
    eval_batches,
    eval_labels,
    load_digits_split,
    preprocess,
)
from qviz.demo.model import DigitsNet
from qviz.errors import QvizError

WEIGHTS_PATH = Path(__file__).with_name("digits_cnn.npz")

__all__ = [
    "WEIGHTS_PATH",
    "DemoWeightsMissingError",
    "DigitsNet",
    "accuracy",
    "calibration_batches",
    "demo_session",
    "demo_session_inputs",
    "eval_batches",
    "eval_labels",
    "load_demo_model",
    "load_digits_split",
    "preprocess",
]


class DemoWeightsMissingError(QvizError, FileNotFoundError):
    """The demo's weights file is not there (never trained, or left out of the install)."""


def load_demo_model(path: str | Path | None = None) -> DigitsNet:
    """The trained :class:`DigitsNet` in eval mode, from the shipped npz (no pickle involved)."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise DemoWeightsMissingError(
            f"demo weights not found at {path}; create them with `python -m qviz.demo.train`"
        )
    model = DigitsNet()
    with np.load(path, allow_pickle=False) as arrays:
        state = {name: torch.from_numpy(arrays[name].copy()) for name in arrays.files}
    model.load_state_dict(state, strict=True)
    return model.eval()


def demo_session_inputs() -> tuple[DigitsNet, list[torch.Tensor], list[torch.Tensor]]:
    """``(model, calibration_batches(), eval_batches())`` with the default batch sizes."""
    return load_demo_model(), calibration_batches(), eval_batches()


def demo_session(flow: str = "fx", backend: str = "x86", progress: bool = True, latency: bool = False):
    """The embedded demo model through ``flow``, run and compared (a few seconds)."""
    from qviz.session import Session

    model, calib, evals = demo_session_inputs()
    return Session(model, calib, flow=flow, backend=backend, eval_data=evals, progress=progress,
                   latency=latency).run()
