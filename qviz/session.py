"""Session: the one facade users, views and reports talk to.

``Session(model, calib_data, flow=..., backend=...).run()`` prepares a deep copy of the model,
calibrates it with probes on every quantization point, converts it and compares it layer by
layer with the float reference. What it keeps is plain data (a frame, a summary dict, point
records with numpy arrays), so a session saves to a file and loads without the model.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import pandas as pd
import torch
from torch import nn

from qviz import __version__
from qviz.analysis.compare import compare_models, find_layers, serialized_size, weight_record
from qviz.capture.probes import PointRecord, describe, probing
from qviz.errors import ConfigError, InputDataError, QvizError
from qviz.flows import make_flow, quantized_engine
from qviz.flows.base import as_args
from qviz.io.results import Results
from qviz.progress import progress_bar
from qviz.torch_warnings import quiet_torch


def _batches(data, what: str) -> list[tuple]:
    """Materialise an iterable of batches as tuples of positional inputs; refuse empty data."""
    if isinstance(data, torch.Tensor):
        raise InputDataError(
            f"{what} must be an iterable of batches, not one tensor: pass [tensor] for a single "
            "batch, or a DataLoader"
        )
    try:
        batches = [as_args(b) for b in data]
    except TypeError as exc:
        raise InputDataError(f"{what} must be an iterable of batches (a list or DataLoader): {exc}") from exc
    if not batches:
        raise InputDataError(f"{what} is empty: give at least one batch (a tensor or a tuple of inputs)")
    for i, args in enumerate(batches):
        if not any(isinstance(a, torch.Tensor) for a in args):
            raise InputDataError(
                f"{what}[{i}] holds no tensor ({type(args[0]).__name__}): each batch is a tensor "
                "or a tuple of the model's positional inputs; drop labels with a generator"
            )
    return batches


def _shapes(args: tuple) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)


def run_batch(model: nn.Module, args: tuple, what: str, index: int, first: tuple):
    """model(*args), with a failure reported as bad data (shapes of this and the first batch)."""
    try:
        return model(*args)
    except QvizError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model failing on a batch is an input problem
        raise InputDataError(
            f"the model failed on {what}[{index}] with inputs of shape {_shapes(args)} "
            f"(the first batch had {_shapes(first)}): {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Check that every batch is what "
            "model(*batch) accepts"
        ) from exc


class Session:
    """Debug one quantization of ``model``: see the module docstring and the README."""

    def __init__(
        self,
        model: nn.Module,
        calib_data: Iterable,
        *,
        flow: str = "fx",
        backend: str = "x86",
        example_inputs=None,
        eval_data: Iterable | None = None,
        plan=None,
        qconfig=None,
        qconfig_mapping=None,
        fuse="auto",
        dynamic_dtype: str = "int8",
        progress: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        options = {"eager": {"qconfig": qconfig, "fuse": fuse}, "fx": {"qconfig_mapping": qconfig_mapping},
                   "dynamic": {"dtype": dynamic_dtype}}
        self.flow = make_flow(flow, backend, **options.get(flow, {}))
        self.backend = backend
        self._model = model
        self._calib = _batches(calib_data, "calib_data")
        self._eval = _batches(eval_data, "eval_data") if eval_data is not None else self._calib[:1]
        self._example = as_args(example_inputs) if example_inputs is not None else self._calib[0]
        self.plan = plan
        self.progress = progress
        self.results: Results | None = None

    # -- running -------------------------------------------------------------------------------
    def run(self) -> Session:
        """Prepare, calibrate with capture, convert and compare; returns ``self``."""
        with quiet_torch(), quantized_engine(self.backend):
            observed = self.flow.prepare(self._model, self._example)
            points = self.flow.quant_points(observed)
            reference = self.flow.reference(observed, points)
            with probing(points) as records:
                with torch.no_grad():
                    for i, args in enumerate(progress_bar(self._calib, "calibrating", self.progress)):
                        run_batch(observed, args, "calib_data", i, self._calib[0])
            for p in points:
                if p.role != "dynamic":
                    describe(records[p.name], p.module)
            quantized = self.flow.convert(observed)
            layers, left_float = find_layers(quantized, reference)
            per_layer, summary, order = compare_models(
                reference, quantized, layers + left_float, self._eval,
                call=lambda model, args, i: run_batch(model, args, "eval_data", i, self._eval[0]),
            )
            weights = {n: weight_record(quantized.get_submodule(n), reference.get_submodule(n)) for n in layers}
            summary["size_bytes"] = serialized_size(quantized)
            summary["nonfinite"] = sum(r.stats.nonfinite for r in records.values())
            summary["left_float"] = left_float
            summary["float_size_bytes"] = serialized_size(self._model)
        self.results = Results.build(
            meta={"flow": self.flow.name, "backend": self.backend, "torch": torch.__version__, "qviz": __version__},
            records=records, per_layer=per_layer, weights=weights, order=order,
            left_float=left_float, summary=summary,
            types={n: type(quantized.get_submodule(n)).__name__ for n in layers + left_float},
        )
        self._warn_left_float(left_float)
        return self

    @staticmethod
    def _warn_left_float(left_float: list[str]) -> None:
        if left_float:
            warnings.warn(
                f"{len(left_float)} layer(s) with weights stayed float because the backend "
                f"could not quantize them or their qconfig is None: {', '.join(left_float)} "
                "(rows with dtype 'float' in to_dataframe())",
                stacklevel=3,
            )

    # -- results -------------------------------------------------------------------------------
    def _results(self) -> Results:
        if self.results is None:
            raise QvizError("this session has not run yet: call session.run() first")
        return self.results

    def to_dataframe(self) -> pd.DataFrame:
        """One row per layer (quantized, or left float), in execution order."""
        return self._results().table.copy()

    def summary(self) -> dict:
        """Model-level figures: output_sqnr, top1_agreement, size_bytes, float_size_bytes, ..."""
        return dict(self._results().summary)

    def points(self) -> pd.DataFrame:
        """One row per quantization point (observer, fake-quant, converted weight)."""
        return self._results().points_frame()

    def record(self, point: str) -> PointRecord:
        """The full record of one quantization point (stats with histogram, qparams arrays)."""
        return self._results().record(point)

    def save(self, path) -> None:
        """Write everything the frame, summary and histograms need to ``path`` (atomically)."""
        self._results().save(path)

    @classmethod
    def from_results(cls, results: Results) -> Session:
        """A session holding saved results only: frames and histograms, no model."""
        session = cls.__new__(cls)
        session.flow, session.backend = None, results.meta.get("backend")
        session._model = session._calib = session._eval = session._example = None
        session.plan, session.progress, session.results = None, False, results
        return session


def load(path) -> Session:
    """Open a session file written by :meth:`Session.save` (safe with files from strangers)."""
    return Session.from_results(Results.load(path))

